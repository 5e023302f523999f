//! The `volumes` job variable: validation with the reference's messages, and resolving
//! explicitly relative bind sources against the worker's directory.
//!
//! Pure.

use std::path::Path;

/// One validated volume string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The string as given (trimmed), relative bind sources already resolved.
    pub bind: String,
    /// The path inside the container (for the create body's `Volumes` set).
    pub container_path: String,
}

fn is_bind_source(host: &str) -> bool {
    let b = host.as_bytes();
    host.starts_with('/')
        || (b.len() >= 3
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && (b[2] == b'\\' || b[2] == b'/'))
        || host.starts_with("\\\\")
        || host == "."
        || host == ".."
        || ["./", "../", ".\\", "..\\"]
            .iter()
            .any(|p| host.starts_with(p))
}

fn is_relative_bind(host: &str) -> bool {
    host == "."
        || host == ".."
        || ["./", "../", ".\\", "..\\"]
            .iter()
            .any(|p| host.starts_with(p))
}

fn is_volume_name(host: &str) -> bool {
    let mut chars = host.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Validates one volume string and resolves a relative bind source against `cwd`.
///
/// # Errors
/// The reference's validation message for the first rule the string breaks.
pub fn parse_volume(raw: &str, cwd: &Path) -> Result<Volume, String> {
    let spec = raw.trim();
    if spec.is_empty() {
        return Err("Invalid volume specification: cannot be empty".to_owned());
    }
    // A Windows drive letter's colon is not a separator.
    let drive = spec.len() >= 3
        && spec.as_bytes()[0].is_ascii_alphabetic()
        && spec.as_bytes()[1] == b':'
        && matches!(spec.as_bytes()[2], b'\\' | b'/');
    let (drive_prefix, rest) = if drive { spec.split_at(2) } else { ("", spec) };
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.len() == 1 && drive_prefix.is_empty() {
        if !spec.starts_with('/') {
            return Err(format!("Invalid volume specification: {spec}"));
        }
        return Ok(Volume {
            bind: spec.to_owned(),
            container_path: spec.to_owned(),
        });
    }
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("Invalid volume specification: {spec}"));
    }
    let host = format!("{drive_prefix}{}", parts[0]);
    let container = parts[1];
    if let Some(option) = parts.get(2)
        && !matches!(*option, "ro" | "rw")
    {
        return Err(format!(
            "Invalid volume option: '{option}'. Must be 'ro' or 'rw'"
        ));
    }
    if is_bind_source(&host) {
        if !container.starts_with('/') {
            return Err("For bind mounts, container path must be absolute".to_owned());
        }
    } else if !is_volume_name(&host) {
        return Err(format!(
            "Invalid volume name: '{host}'. Named volumes must match [a-zA-Z0-9][a-zA-Z0-9_.-]*. Shell expressions such as $(pwd) are not evaluated; use an absolute host path or an explicit relative path such as '.' or './dir' for bind mounts."
        ));
    }
    let bind = if is_relative_bind(&host) {
        let resolved = normalize(&cwd.join(&host));
        let mut s = format!("{resolved}:{container}");
        if let Some(option) = parts.get(2) {
            s.push(':');
            s.push_str(option);
        }
        s
    } else {
        spec.to_owned()
    };
    Ok(Volume {
        bind,
        container_path: container.to_owned(),
    })
}

/// Lexically normalises a path (`/a/./b/../c` → `/a/c`) without touching the filesystem.
fn normalize(path: &Path) -> String {
    use std::path::Component;
    let mut out: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir => out.clear(),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p.to_string_lossy().into_owned()),
            Component::Prefix(p) => out.push(p.as_os_str().to_string_lossy().into_owned()),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: &str) -> Volume {
        parse_volume(v, Path::new("/work/dir")).unwrap()
    }
    fn err(v: &str) -> String {
        parse_volume(v, Path::new("/work/dir")).unwrap_err()
    }

    #[test]
    fn valid_forms() {
        assert_eq!(ok("/tmp:/hosttmp").bind, "/tmp:/hosttmp");
        assert_eq!(ok("/tmp:/hosttmp").container_path, "/hosttmp");
        assert_eq!(ok(" pfnamedvol:/nv ").bind, "pfnamedvol:/nv");
        assert_eq!(ok("/anon").container_path, "/anon");
        assert_eq!(ok("./data:/data:ro").bind, "/work/dir/data:/data:ro");
        assert_eq!(ok(".:/w").bind, "/work/dir:/w");
        assert_eq!(ok("../up:/u:rw").bind, "/work/up:/u:rw");
        assert_eq!(ok("C:\\data:/data").container_path, "/data");
    }

    #[test]
    fn messages() {
        assert_eq!(err("  "), "Invalid volume specification: cannot be empty");
        assert_eq!(err("relative"), "Invalid volume specification: relative");
        assert_eq!(err("a:b:c:d"), "Invalid volume specification: a:b:c:d");
        assert_eq!(
            err("/tmp:rel"),
            "For bind mounts, container path must be absolute"
        );
        assert_eq!(
            err("/tmp:/x:rx"),
            "Invalid volume option: 'rx'. Must be 'ro' or 'rw'"
        );
        assert!(
            err("$(pwd):/x").starts_with("Invalid volume name: '$(pwd)'. Named volumes must match")
        );
    }
}
