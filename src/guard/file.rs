//! The policy file: TOML, every key checked when it is read, so a typo or a value that could
//! not be applied stops the worker at start with the file, the line and the problem instead
//! of weakening the policy silently.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{Allow, Deny, Force, Namespace};
use crate::job::memory::parse_bytes;

/// Why a policy file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyFileError {
    /// The file.
    pub path: PathBuf,
    /// Where in it (1-based line and column), when the problem has a place.
    pub at: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(
                f,
                "{}: line {line}, column {column}: {}",
                self.path.display(),
                self.message
            ),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    deny: DenySection,
    #[serde(default)]
    allow: AllowSection,
    #[serde(default)]
    force: ForceSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenySection {
    #[serde(default)]
    privileged: bool,
    #[serde(default)]
    host_namespaces: Vec<Namespace>,
    bind_outside: Option<Vec<AbsolutePath>>,
    #[serde(default)]
    cap_add: bool,
    #[serde(default)]
    devices: bool,
    #[serde(default)]
    unconfined: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSection {
    registries: Option<Vec<Pattern>>,
    capabilities: Option<Spanned<Vec<Capability>>>,
    devices: Option<Spanned<Vec<AbsolutePath>>>,
    create_kwargs: Option<Vec<Keyword>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceSection {
    #[serde(default)]
    no_new_privileges: bool,
    #[serde(default)]
    read_only_rootfs: bool,
    tmpfs: Option<Vec<Tmpfs>>,
    user: Option<User>,
    pids_limit: Option<PidsLimit>,
    memory: Option<Spanned<Bytes>>,
    max_memory: Option<Bytes>,
    cpus: Option<Spanned<Cpus>>,
    max_cpus: Option<Cpus>,
    #[serde(default)]
    cap_drop: Vec<Capability>,
}

/// Declares a newtype read from TOML through a checking function, so a bad value is an error
/// at its own place in the file.
macro_rules! checked {
    ($name:ident($inner:ty) from $raw:ty, $check:expr) => {
        #[derive(Debug, Clone, PartialEq)]
        struct $name($inner);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = <$raw>::deserialize(d)?;
                let check: fn($raw) -> Result<$inner, String> = $check;
                check(raw).map($name).map_err(serde::de::Error::custom)
            }
        }
    };
}

checked!(AbsolutePath(PathBuf) from String, |s| {
    let path = PathBuf::from(s.trim_end_matches('/'));
    let path = if path.as_os_str().is_empty() { PathBuf::from("/") } else { path };
    if !path.is_absolute() {
        return Err(format!("expected an absolute path, got {s:?}"));
    }
    if super::paths::has_parent_dir(&path) {
        return Err(format!("a path with `..` is ambiguous: {s:?}"));
    }
    Ok(path)
});

checked!(Pattern(String) from String, |s| {
    if s.trim().is_empty() {
        Err("an image pattern cannot be empty".to_owned())
    } else {
        Ok(s.trim().to_owned())
    }
});

checked!(Capability(String) from String, |s| {
    let name = normalize_capability(&s);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Err(format!("expected a capability name such as \"NET_ADMIN\", got {s:?}"))
    } else {
        Ok(name)
    }
});

checked!(Keyword(String) from String, |s| {
    if crate::job::create_kwargs::is_keyword(&s) {
        Ok(s)
    } else {
        Err(format!("{s:?} is not a container_create_kwargs keyword this worker knows"))
    }
});

checked!(Tmpfs(String) from String, |s| {
    if s.starts_with('/') {
        Ok(s)
    } else {
        Err(format!("expected an absolute path with optional mount options (\"/tmp:size=64m\"), got {s:?}"))
    }
});

checked!(User(String) from String, |s| {
    if s.trim().is_empty() {
        Err("the user cannot be empty".to_owned())
    } else {
        Ok(s.trim().to_owned())
    }
});

checked!(PidsLimit(i64) from i64, |n| {
    if n >= 1 { Ok(n) } else { Err(format!("expected at least 1, got {n}")) }
});

/// A size written as docker-py reads it (`"512m"`, `"2g"`) or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bytes(i64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bytes = match Raw::deserialize(d)? {
            Raw::Number(n) => n,
            Raw::Text(s) => parse_bytes(&s).map_err(serde::de::Error::custom)?,
        };
        if bytes < 4 * 1024 * 1024 {
            return Err(serde::de::Error::custom(format!(
                "expected a size of at least 4m (the Engine's minimum), got {bytes} bytes"
            )));
        }
        Ok(Self(bytes))
    }
}

/// CPUs as `docker run --cpus` takes them, kept as the Engine's `NanoCpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cpus(i64);

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let cpus = f64::deserialize(d)?;
        if !(0.001..=1000.0).contains(&cpus) {
            return Err(serde::de::Error::custom(format!(
                "expected a number of CPUs from 0.001 to 1000, got {cpus}"
            )));
        }
        // In range, so the product fits an i64.
        Ok(Self((cpus * 1e9).round() as i64))
    }
}

/// `cap_sys_admin` and `CAP_SYS_ADMIN` are `SYS_ADMIN`, as the Engine reads them.
pub(crate) fn normalize_capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper
        .strip_prefix("CAP_")
        .map_or_else(|| upper.clone(), str::to_owned)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The three sections of a policy file, checked.
pub(super) struct Sections {
    pub deny: Deny,
    pub allow: Allow,
    pub force: Force,
}

/// Reads and checks a policy file's text; `path` names it in errors.
pub(super) fn parse(text: &str, path: &Path) -> Result<Sections, PolicyFileError> {
    let error = |span: Option<std::ops::Range<usize>>, message: String| PolicyFileError {
        path: path.to_owned(),
        at: span.map(|s| line_column(text, s.start)),
        message,
    };
    let file: PolicyFile =
        toml::from_str(text).map_err(|e| error(e.span(), e.message().trim().to_owned()))?;
    let PolicyFile { deny, allow, force } = file;
    if let Some(caps) = &allow.capabilities
        && !deny.cap_add
    {
        return Err(error(
            Some(caps.span()),
            "allow.capabilities has no effect without `cap_add = true` under [deny]".into(),
        ));
    }
    if let Some(devices) = &allow.devices
        && !deny.devices
    {
        return Err(error(
            Some(devices.span()),
            "allow.devices has no effect without `devices = true` under [deny]".into(),
        ));
    }
    if let (Some(memory), Some(max)) = (&force.memory, force.max_memory)
        && memory.get_ref().0 > max.0
    {
        return Err(error(
            Some(memory.span()),
            "the default memory is above max_memory".into(),
        ));
    }
    if let (Some(cpus), Some(max)) = (&force.cpus, force.max_cpus)
        && cpus.get_ref().0 > max.0
    {
        return Err(error(
            Some(cpus.span()),
            "the default cpus is above max_cpus".into(),
        ));
    }
    let tmpfs = match force.tmpfs {
        Some(list) => list.into_iter().map(|t| t.0).collect(),
        None if force.read_only_rootfs => vec!["/tmp".to_owned()],
        None => Vec::new(),
    };
    Ok(Sections {
        deny: Deny {
            privileged: deny.privileged,
            host_namespaces: deny.host_namespaces,
            bind_outside: deny
                .bind_outside
                .map(|list| list.into_iter().map(|p| p.0).collect()),
            cap_add: deny.cap_add,
            devices: deny.devices,
            unconfined: deny.unconfined,
        },
        allow: Allow {
            registries: allow
                .registries
                .map(|list| list.into_iter().map(|p| p.0).collect()),
            capabilities: allow
                .capabilities
                .map(|c| c.into_inner().into_iter().map(|c| c.0).collect())
                .unwrap_or_default(),
            devices: allow
                .devices
                .map(|d| d.into_inner().into_iter().map(|d| d.0).collect())
                .unwrap_or_default(),
            create_kwargs: allow
                .create_kwargs
                .map(|list| list.into_iter().map(|k| k.0).collect()),
        },
        force: Force {
            no_new_privileges: force.no_new_privileges,
            read_only_rootfs: force.read_only_rootfs,
            tmpfs,
            user: force.user.map(|u| u.0),
            pids_limit: force.pids_limit.map(|p| p.0),
            memory: force.memory.map(|m| m.into_inner().0),
            max_memory: force.max_memory.map(|m| m.0),
            nano_cpus: force.cpus.map(|c| c.into_inner().0),
            max_nano_cpus: force.max_cpus.map(|c| c.0),
            cap_drop: force.cap_drop.into_iter().map(|c| c.0).collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PolicyFileError {
        match parse(text, Path::new("/etc/p.toml")) {
            Err(e) => e,
            Ok(_) => panic!("accepted:\n{text}"),
        }
    }

    #[test]
    fn the_issue_example_reads() {
        let s = parse(
            r#"
[deny]
privileged = true
host_namespaces = ["network", "pid", "ipc", "uts"]
bind_outside = ["/srv/prefect-data"]   # allowed host prefixes; everything else is refused
[allow]
registries = ["registry.internal:5000/*", "local/*"]
[force]
no_new_privileges = true
read_only_rootfs = true
user = "1000:1000"
pids_limit = 512
"#,
            Path::new("p.toml"),
        )
        .unwrap();
        assert!(s.deny.privileged);
        assert_eq!(s.deny.host_namespaces.len(), 4);
        assert_eq!(
            s.deny.bind_outside,
            Some(vec![PathBuf::from("/srv/prefect-data")])
        );
        assert_eq!(s.force.tmpfs, vec!["/tmp"]);
        assert_eq!(s.force.user.as_deref(), Some("1000:1000"));
        assert_eq!(s.force.pids_limit, Some(512));
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let e = err("[deny]\nprivileged = true\nprivilegd = true\n");
        assert_eq!(e.at, Some((3, 1)), "{e}");
        assert!(e.message.contains("unknown field `privilegd`"), "{e}");
        assert!(e.to_string().starts_with("/etc/p.toml: line 3, column 1: "));
        let e = err("[deny]\nhost_namespaces = [\"network\", \"net\"]\n");
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        assert!(e.message.contains("unknown variant `net`"), "{e}");
        let e = err("[deny]\nbind_outside = [\"data\"]\n");
        assert!(e.message.contains("absolute path"), "{e}");
        let e = err("[force]\nmemory = \"2x\"\n");
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        assert!(e.message.contains("units"), "{e}");
        let e = err("[force]\nmemory = \"8g\"\nmax_memory = \"2g\"\n");
        assert_eq!(e.at.map(|a| a.0), Some(2), "{e}");
        let e = err("[allow]\ncapabilities = [\"NET_ADMIN\"]\n");
        assert!(e.message.contains("cap_add = true"), "{e}");
        let e = err("[allow]\ncreate_kwargs = [\"shm-size\"]\n");
        assert!(e.message.contains("shm-size"), "{e}");
        let e = err("[deny\n");
        assert_eq!(e.at.map(|a| a.0), Some(1), "{e}");
        let e = err("[force]\ncpus = 0\n");
        assert!(e.message.contains("0.001"), "{e}");
        let e = err("[force]\npids_limit = 0\n");
        assert!(e.message.contains("at least 1"), "{e}");
    }

    #[test]
    fn an_empty_file_is_no_rule_at_all() {
        let s = parse("", Path::new("p.toml")).unwrap();
        assert!(!s.deny.privileged && s.deny.bind_outside.is_none());
        assert!(s.allow.registries.is_none() && s.force.tmpfs.is_empty());
    }

    #[test]
    fn capabilities_are_normalised() {
        assert_eq!(normalize_capability("cap_net_admin"), "NET_ADMIN");
        assert_eq!(normalize_capability(" sys_admin "), "SYS_ADMIN");
    }
}
