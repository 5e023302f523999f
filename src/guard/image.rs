//! Image references against the allowed patterns: a glob (`*` any run of characters, `/`
//! included; `?` one character) over the whole reference, so a pattern names a registry
//! (`registry.internal:5000/*`), a repository (`registry.internal:5000/team/app:*`) or one
//! image. An image matches when its familiar name (as `docker` prints it: `busybox:latest`,
//! `local/app:1`) or its full name (`docker.io/library/busybox:latest`) does: both name the
//! same image, so neither widens what a pattern allows.

/// Whether `text` matches the glob `pattern` as a whole.
pub(crate) fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Classic iterative matcher with backtracking to the last `*`: linear in practice and
    // never recursive, so no pattern can blow the stack.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The registry part of a reference, as the Engine decides it: the first path component
/// when it has a `.` or a `:` or is `localhost`, else Docker Hub.
fn split_registry(image: &str) -> (&str, &str) {
    match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("docker.io", image),
    }
}

/// The familiar and the full name of an image reference, with `:latest` added when it has
/// neither tag nor digest.
pub(crate) fn image_names(image: &str) -> [String; 2] {
    let (registry, path) = split_registry(image.trim());
    let registry = match registry {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    };
    let last = path.rsplit('/').next().unwrap_or(path);
    let tagged = if last.contains(':') || path.contains('@') {
        path.to_owned()
    } else {
        format!("{path}:latest")
    };
    if registry == "docker.io" {
        let full_path = if tagged.contains('/') {
            tagged.clone()
        } else {
            format!("library/{tagged}")
        };
        let familiar = tagged
            .strip_prefix("library/")
            .map_or_else(|| tagged.clone(), str::to_owned);
        [familiar, format!("docker.io/{full_path}")]
    } else {
        let full = format!("{registry}/{tagged}");
        [full.clone(), full]
    }
}

/// Whether any pattern allows `image`.
pub(crate) fn image_allowed(patterns: &[String], image: &str) -> bool {
    let names = image_names(image);
    patterns
        .iter()
        .any(|p| names.iter().any(|n| glob_matches(p, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_matches("local/*", "local/busybox:dw"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "ac"));
        assert!(glob_matches("r:5000/*/app:*", "r:5000/team/x/app:1"));
        assert!(!glob_matches("r:5000/*", "r:5000.evil.com/x"));
        assert!(!glob_matches("local/*", "localx/busybox"));
        assert!(glob_matches(
            "*a*a*a*a*b",
            &"a".repeat(40).replace("aa", "ab")
        ));
    }

    #[test]
    fn names() {
        assert_eq!(
            image_names("busybox"),
            [
                "busybox:latest".to_owned(),
                "docker.io/library/busybox:latest".to_owned()
            ]
        );
        assert_eq!(
            image_names("local/busybox:dw"),
            [
                "local/busybox:dw".to_owned(),
                "docker.io/local/busybox:dw".to_owned()
            ]
        );
        assert_eq!(
            image_names("index.docker.io/library/busybox:1"),
            [
                "busybox:1".to_owned(),
                "docker.io/library/busybox:1".to_owned()
            ]
        );
        assert_eq!(
            image_names("127.0.0.1:5000/a/b"),
            [
                "127.0.0.1:5000/a/b:latest".to_owned(),
                "127.0.0.1:5000/a/b:latest".to_owned()
            ]
        );
        assert_eq!(
            image_names("x@sha256:ab")[1],
            "docker.io/library/x@sha256:ab"
        );
    }

    #[test]
    fn allowed() {
        let patterns = vec!["registry.internal:5000/*".to_owned(), "local/*".to_owned()];
        assert!(image_allowed(&patterns, "local/busybox:dw"));
        assert!(image_allowed(&patterns, "docker.io/local/busybox:dw"));
        assert!(image_allowed(
            &patterns,
            "registry.internal:5000/team/app:1"
        ));
        assert!(!image_allowed(&patterns, "busybox"));
        assert!(!image_allowed(&patterns, "registry.internal:5001/app"));
        assert!(!image_allowed(&patterns, "evil.io/local/x"));
        let hub = vec!["docker.io/library/*".to_owned()];
        assert!(image_allowed(&hub, "python:3.12"));
        assert!(!image_allowed(&hub, "someone/python:3.12"));
    }
}
