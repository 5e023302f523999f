//! Host paths as the Engine will see them: every symlink resolved on the host before a bind
//! mount is judged, so a link under an allowed directory cannot point the Engine elsewhere
//! (HCSEC-2026-21 in Nomad was exactly that). The resolution is a trait so the policy stays
//! testable; [`RealHost`] does it with `std::fs`.

use std::path::{Component, Path, PathBuf};

/// Resolves host paths.
pub trait HostPaths: Send + Sync {
    /// `path` (absolute, without `..`) with every symlink of its existing part resolved; the
    /// part that does not exist yet (the Engine creates a missing bind source) is kept as
    /// written, since nothing there can be a link.
    fn resolve(&self, path: &Path) -> PathBuf;
}

/// The host's own filesystem, as this process sees it (its mount namespace: a systemd
/// `PrivateTmp=` hides the real `/tmp` from it).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealHost;

impl HostPaths for RealHost {
    fn resolve(&self, path: &Path) -> PathBuf {
        resolve_with(path, &|p| std::fs::canonicalize(p))
    }
}

/// The resolution, walking the path one component at a time: while the path exists, each
/// step is canonicalised (which follows a link and every link in its target); from the first
/// missing component on, the rest is appended as written.
pub(crate) fn resolve_with(
    path: &Path,
    canonicalize: &dyn Fn(&Path) -> std::io::Result<PathBuf>,
) -> PathBuf {
    let mut resolved = PathBuf::from("/");
    let mut missing = false;
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            // The prefix resolved so far is canonical, so `..` is its parent.
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => {
                let next = resolved.join(name);
                if missing {
                    resolved = next;
                    continue;
                }
                match canonicalize(&next) {
                    Ok(real) => resolved = real,
                    Err(_) => {
                        missing = true;
                        resolved = next;
                    }
                }
            }
        }
    }
    resolved
}

/// Whether a path has a `..` component: the Engine cleans such a path lexically before it
/// follows links, the kernel the other way round, so the policy refuses to guess.
pub(crate) fn has_parent_dir(path: &Path) -> bool {
    path.components().any(|c| matches!(c, Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_are_followed_and_missing_tails_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("allowed/real")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        symlink(root.join("elsewhere"), root.join("allowed/link")).unwrap();
        symlink("../allowed/link", root.join("allowed/relative")).unwrap();
        let host = RealHost;
        assert_eq!(
            host.resolve(&root.join("allowed/real")),
            root.join("allowed/real")
        );
        assert_eq!(
            host.resolve(&root.join("allowed/link/x/y")),
            root.join("elsewhere/x/y")
        );
        assert_eq!(
            host.resolve(&root.join("allowed/relative")),
            root.join("elsewhere")
        );
        assert_eq!(
            host.resolve(&root.join("allowed/new/deeper")),
            root.join("allowed/new/deeper")
        );
        assert_eq!(host.resolve(Path::new("/")), PathBuf::from("/"));
    }

    #[test]
    fn parent_components_are_found() {
        assert!(has_parent_dir(Path::new("/srv/data/../etc")));
        assert!(!has_parent_dir(Path::new("/srv/data/..x")));
    }
}
