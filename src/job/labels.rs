//! Docker label keys from Prefect label keys (`prefect.io/flow-run-id` → `io.prefect.flow-run-id`).
//!
//! Pure.

/// Converts a Prefect-style label key to Docker's reverse-DNS convention: a key with a `/`
/// has the part before the first `/` reversed on `.`; keys without `/` are unchanged.
pub fn docker_label_key(key: &str) -> String {
    match key.split_once('/') {
        Some((domain, rest)) => {
            let reversed: Vec<&str> = domain.split('.').rev().collect();
            format!("{}.{rest}", reversed.join("."))
        }
        None => key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion() {
        assert_eq!(
            docker_label_key("prefect.io/flow-run-id"),
            "io.prefect.flow-run-id"
        );
        assert_eq!(docker_label_key("a.b.c/d/e"), "c.b.a.d/e");
        assert_eq!(docker_label_key("plain"), "plain");
        assert_eq!(docker_label_key("x/y"), "x.y");
    }
}
