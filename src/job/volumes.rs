//! The `volumes` job variable: validation with the reference's messages, and resolving
//! explicitly relative bind sources against the worker's directory.
//!
//! Pure.

use std::path::Path;

use super::template::python_string_repr;

/// One validated volume string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The string as given (trimmed), relative bind sources already resolved.
    pub bind: String,
    /// The path inside the container (for the create body's `Volumes` set).
    pub container_path: String,
}

/// A Windows drive prefix (`C:\`); only the backslash form counts, as in the reference.
fn has_drive_prefix(host: &str) -> bool {
    let b = host.as_bytes();
    b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'\\'
}

fn is_relative_bind(host: &str) -> bool {
    host == "."
        || host == ".."
        || ["./", "../", ".\\", "..\\"]
            .iter()
            .any(|p| host.starts_with(p))
}

fn is_bind_source(host: &str) -> bool {
    host.starts_with('/')
        || has_drive_prefix(host)
        || host.starts_with("\\\\")
        || is_relative_bind(host)
}

fn is_volume_name(host: &str) -> bool {
    let mut chars = host.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Splits `host:container[:options]`. The host and container are non-empty and colon-free
/// (except a host's drive prefix `C:\`, taken when the rest still splits); the options are
/// everything after the second separator (so `ro:x` is one, invalid, option) and may not
/// contain a line break. `None` when the string has no such shape.
fn split_volume(spec: &str) -> Option<(&str, &str, Option<&str>)> {
    let split_after_host = |host_end: usize| {
        let rest = &spec[host_end + 1..];
        let (container, options) = match rest.split_once(':') {
            Some((container, options)) => (container, Some(options)),
            None => (rest, None),
        };
        let bad_options = options.is_some_and(|o| o.is_empty() || o.contains('\n'));
        (!container.is_empty() && !bad_options).then_some((&spec[..host_end], container, options))
    };
    if has_drive_prefix(spec)
        && let Some(end) = spec[3..].find(':').filter(|i| *i > 0)
        && let Some(parts) = split_after_host(end + 3)
    {
        return Some(parts);
    }
    spec.find(':')
        .filter(|end| *end > 0)
        .and_then(split_after_host)
}

/// Validates one volume string and resolves a relative bind source against `cwd`.
///
/// The forms: an anonymous volume `/container/path`; `host:container[:ro|rw]` where the host is
/// a bind source (absolute, `C:\…`, `\\…`, or explicitly relative: `.`, `..`, `./…`,
/// `../…`) needing an absolute container path, or else a volume name
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
///
/// # Errors
/// The reference's validation message for the first rule the string breaks, in the
/// reference's order (shape, then bind path or volume name, then the option).
pub fn parse_volume(raw: &str, cwd: &Path) -> Result<Volume, String> {
    let spec = raw.trim();
    if spec.is_empty() {
        return Err("Invalid volume specification: cannot be empty".to_owned());
    }
    let invalid = || format!("Invalid volume specification: {raw}");
    if !spec.contains(':') {
        // Anonymous volume: a container path, and more than the root.
        if spec.starts_with('/') && spec.len() > 1 {
            return Ok(Volume {
                bind: spec.to_owned(),
                container_path: spec.to_owned(),
            });
        }
        return Err(invalid());
    }
    let (host, container, options) = split_volume(spec).ok_or_else(invalid)?;
    if is_bind_source(host) {
        if !container.starts_with('/') {
            return Err("For bind mounts, container path must be absolute".to_owned());
        }
    } else if !is_volume_name(host) {
        return Err(format!(
            "Invalid volume name: {}. Named volumes must match [a-zA-Z0-9][a-zA-Z0-9_.-]*. Shell expressions such as $(pwd) are not evaluated; use an absolute host path or an explicit relative path such as '.' or './dir' for bind mounts.",
            python_string_repr(host)
        ));
    }
    if let Some(option) = options
        && !matches!(option, "ro" | "rw")
    {
        return Err(format!(
            "Invalid volume option: {}. Must be 'ro' or 'rw'",
            python_string_repr(option)
        ));
    }
    let bind = if is_relative_bind(host) {
        format!("{}{}", normalize(&cwd.join(host)), &spec[host.len()..])
    } else {
        spec.to_owned()
    };
    // docker-py's `Volumes` entry: a named volume written `name:ro` names no container path,
    // so the whole host part stands in for it.
    let container_path = if options.is_none() && matches!(container, "ro" | "rw") {
        host
    } else {
        container
    };
    Ok(Volume {
        bind,
        container_path: container_path.to_owned(),
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
        assert_eq!(ok("/anon ").bind, "/anon");
        assert_eq!(ok("/x:/y:ro").container_path, "/y");
        assert_eq!(ok("C:\\data:/data").container_path, "/data");
        assert_eq!(ok("\\\\srv\\share:/x").bind, "\\\\srv\\share:/x");
        assert_eq!(ok("/a b:/x").bind, "/a b:/x");
        assert_eq!(ok("v.1_-:/x").bind, "v.1_-:/x");
        // A named volume needs no absolute container path (the Engine decides).
        assert_eq!(ok("vol:data").container_path, "data");
        // The reference reads `C:\data` as volume `C` at `\data`.
        assert_eq!(ok("C:\\data").container_path, "\\data");
    }

    #[test]
    fn relative_binds_resolve_against_the_worker_directory() {
        // As the reference's os.path.abspath does (observed with cwd /tmp/audit/w).
        assert_eq!(ok("./data:/data:ro").bind, "/work/dir/data:/data:ro");
        assert_eq!(ok(".:/w").bind, "/work/dir:/w");
        assert_eq!(ok("..:/u").bind, "/work:/u");
        assert_eq!(ok("../up:/u:rw").bind, "/work/up:/u:rw");
        assert_eq!(ok("../x/./y:/z:ro").bind, "/work/x/y:/z:ro");
        assert_eq!(ok("./:/r").bind, "/work/dir:/r");
        // A backslash is not a separator on Linux: `.\win` is one relative component.
        assert_eq!(ok(".\\win:/p").bind, "/work/dir/.\\win:/p");
        assert_eq!(ok("..\\up:/q").bind, "/work/dir/..\\up:/q");
        // Absolute, named and anonymous volumes are left alone.
        assert_eq!(ok("/abs:/a").bind, "/abs:/a");
        assert_eq!(ok("named:/n").bind, "named:/n");
    }

    #[test]
    fn messages() {
        // Every message below is what prefect-docker 0.7.4's validator says for the same input.
        assert_eq!(err(""), "Invalid volume specification: cannot be empty");
        assert_eq!(err("  "), "Invalid volume specification: cannot be empty");
        assert_eq!(err("relative"), "Invalid volume specification: relative");
        // The untrimmed string is quoted.
        assert_eq!(err(" a "), "Invalid volume specification:  a ");
        assert_eq!(err("/"), "Invalid volume specification: /");
        assert_eq!(err(":/x"), "Invalid volume specification: :/x");
        assert_eq!(err("/x:"), "Invalid volume specification: /x:");
        assert_eq!(err("/a:/b:"), "Invalid volume specification: /a:/b:");
        assert_eq!(
            err("/a:/b:r\no"),
            "Invalid volume specification: /a:/b:r\no"
        );
        assert_eq!(
            err("/tmp:rel"),
            "For bind mounts, container path must be absolute"
        );
        assert_eq!(
            err("C:\\data:rel"),
            "For bind mounts, container path must be absolute"
        );
        assert_eq!(
            err("\\\\srv\\share:x"),
            "For bind mounts, container path must be absolute"
        );
        // The container path is checked before the option.
        assert_eq!(
            err("/tmp:rel:rx"),
            "For bind mounts, container path must be absolute"
        );
        assert_eq!(
            err("/tmp:/x:rx"),
            "Invalid volume option: 'rx'. Must be 'ro' or 'rw'"
        );
        assert_eq!(
            err("/x:/y:RO"),
            "Invalid volume option: 'RO'. Must be 'ro' or 'rw'"
        );
        // Everything after the second ':' is the option.
        assert_eq!(
            err("/a:/b:ro:x"),
            "Invalid volume option: 'ro:x'. Must be 'ro' or 'rw'"
        );
        assert_eq!(
            err("a:b:c:d"),
            "Invalid volume option: 'c:d'. Must be 'ro' or 'rw'"
        );
        assert_eq!(
            err("a:/b::"),
            "Invalid volume option: ':'. Must be 'ro' or 'rw'"
        );
        // Only `C:\` is a drive: `C:/data` is volume `C` with option `/data`.
        assert_eq!(
            err("C:/data:/data"),
            "Invalid volume option: '/data'. Must be 'ro' or 'rw'"
        );
        assert_eq!(
            err("C:\\:/x"),
            "Invalid volume option: '/x'. Must be 'ro' or 'rw'"
        );
        let name = |host: &str| {
            format!(
                "Invalid volume name: {host}. Named volumes must match [a-zA-Z0-9][a-zA-Z0-9_.-]*. Shell expressions such as $(pwd) are not evaluated; use an absolute host path or an explicit relative path such as '.' or './dir' for bind mounts."
            )
        };
        assert_eq!(err("$(pwd):/x"), name("'$(pwd)'"));
        // The volume name is checked before the option.
        assert_eq!(err("$(pwd):/x:rx"), name("'$(pwd)'"));
        assert_eq!(err("_vol:/x"), name("'_vol'"));
        assert_eq!(err("v$:/x"), name("'v$'"));
        assert_eq!(err("-v:/x"), name("'-v'"));
        assert_eq!(err("~/d:/d"), name("'~/d'"));
        assert_eq!(err("a b:/x"), name("'a b'"));
        // Python's repr picks the quotes.
        assert_eq!(err("it's:/x"), name("\"it's\""));
    }
}

#[cfg(test)]
mod properties {
    use std::path::Path;

    use proptest::prelude::*;

    use super::parse_volume;
    use crate::job::strategies::{config, joined, text};

    /// Pieces of volume strings: paths, drive prefixes, UNC roots, relative markers, names,
    /// separators and options.
    const PIECES: &[&str] = &[
        "/", "/data", ":", "ro", "rw", "RO", ".", "..", "./", "../", ".\\", "C:\\", "\\\\srv",
        "vol", "_v", "$(pwd)", " ", "\n", "é", "a b", "x",
    ];

    proptest! {
        #![proptest_config(config(512))]

        /// Any volume string is a volume or the reference's message, never a panic; a volume's
        /// bind string (relative sources already resolved) validates to the same volume.
        #[test]
        fn volumes_validate_and_are_stable(spec in prop_oneof![text(), joined(PIECES, 6)]) {
            let cwd = Path::new("/work/dir");
            match parse_volume(&spec, cwd) {
                Ok(volume) => {
                    prop_assert!(!volume.bind.is_empty() && !volume.container_path.is_empty());
                    prop_assert_eq!(parse_volume(&volume.bind, cwd), Ok(volume.clone()));
                }
                Err(message) => prop_assert!(!message.is_empty()),
            }
        }
    }
}
