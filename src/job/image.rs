//! Image references: splitting off the tag or digest, and the pull policy that follows.
//!
//! Pure. Mirrors the reference's parsing (a registry port is not a tag; a digest wins
//! over a tag) but reports `a:b:c` as a clear error instead of a Python unpacking error.

use serde::{Deserialize, Serialize};

/// The `image_pull_policy` job variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pull only when the image is not present locally.
    IfNotPresent,
    /// Always pull.
    Always,
    /// Try to pull; fall back to a local image when the pull fails.
    IfPossible,
    /// Never pull; the image must be present.
    Never,
}

impl PullPolicy {
    /// Parses the job variable's string form.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "IfNotPresent" => Some(Self::IfNotPresent),
            "Always" => Some(Self::Always),
            "IfPossible" => Some(Self::IfPossible),
            "Never" => Some(Self::Never),
            _ => None,
        }
    }

    /// The name users write in job variables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IfNotPresent => "IfNotPresent",
            Self::Always => "Always",
            Self::IfPossible => "IfPossible",
            Self::Never => "Never",
        }
    }
}

/// An image reference split into repository and tag (or digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Everything before the tag/digest separator, registry and port included.
    pub repository: String,
    /// The tag (`v1`) or digest (`sha256:…`), if any.
    pub tag: Option<String>,
}

/// Why an image reference could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference '{image}': expected at most one tag or digest separator")]
pub struct InvalidImage {
    /// The reference as written.
    pub image: String,
}

impl ImageRef {
    /// Splits `image` the way the reference does (see the protocol reference §11.2).
    ///
    /// # Errors
    /// [`InvalidImage`] for references with more than one separator (`a:b:c`).
    pub fn parse(image: &str) -> Result<Self, InvalidImage> {
        let invalid = || InvalidImage {
            image: image.to_owned(),
        };
        let (prefix, rest) = match image.split_once('/') {
            Some((registry, rest)) => (Some(registry), rest),
            None => (None, image),
        };
        let sep = if rest.contains('@') { '@' } else { ':' };
        let mut parts = rest.split(sep);
        let name = parts.next().unwrap_or_default();
        let tag = parts.next();
        if parts.next().is_some() {
            return Err(invalid());
        }
        let repository = match prefix {
            Some(registry) => format!("{registry}/{name}"),
            None => name.to_owned(),
        };
        Ok(Self {
            repository,
            tag: tag.map(str::to_owned),
        })
    }

    /// The effective policy when none is configured: untagged and `latest` images are
    /// always pulled, anything pinned is pulled only when missing.
    pub fn default_pull_policy(&self) -> PullPolicy {
        match self.tag.as_deref() {
            None | Some("latest") => PullPolicy::Always,
            Some(_) => PullPolicy::IfNotPresent,
        }
    }

    /// True when the tag is a digest (`sha256:…`).
    pub fn is_digest(&self) -> bool {
        self.tag.as_deref().is_some_and(|t| t.contains(':'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(image: &str) -> (String, Option<String>) {
        let r = ImageRef::parse(image).unwrap();
        (r.repository, r.tag)
    }

    #[test]
    fn tag_parsing_edge_cases() {
        assert_eq!(split("busybox"), ("busybox".into(), None));
        assert_eq!(
            split("busybox:1.36"),
            ("busybox".into(), Some("1.36".into()))
        );
        assert_eq!(
            split("localhost:5000/img"),
            ("localhost:5000/img".into(), None)
        );
        assert_eq!(
            split("localhost:5000/img:v1"),
            ("localhost:5000/img".into(), Some("v1".into()))
        );
        assert_eq!(
            split("repo/img@sha256:abc"),
            ("repo/img".into(), Some("sha256:abc".into()))
        );
        assert_eq!(
            split("registry:5000/ns/img:tag@sha256:abc"),
            ("registry:5000/ns/img:tag".into(), Some("sha256:abc".into()))
        );
        assert!(ImageRef::parse("a:b:c").is_err());
        assert!(ImageRef::parse("a/b:c:d").is_err());
    }

    #[test]
    fn default_policy_by_tag() {
        let p = |i: &str| ImageRef::parse(i).unwrap().default_pull_policy();
        assert_eq!(p("busybox"), PullPolicy::Always);
        assert_eq!(p("busybox:latest"), PullPolicy::Always);
        assert_eq!(p("busybox:1"), PullPolicy::IfNotPresent);
        assert_eq!(p("repo/img@sha256:abc"), PullPolicy::IfNotPresent);
        assert_eq!(p("localhost:5000/img"), PullPolicy::Always);
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [
            PullPolicy::IfNotPresent,
            PullPolicy::Always,
            PullPolicy::IfPossible,
            PullPolicy::Never,
        ] {
            assert_eq!(PullPolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(PullPolicy::parse("always"), None);
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::{ImageRef, PullPolicy};
    use crate::job::strategies::{config, joined, text};

    /// Pieces of image references: registries with ports, paths, tags, digests.
    const PIECES: &[&str] = &[
        "busybox",
        "localhost",
        ":5000",
        "/",
        "ns",
        ":",
        "latest",
        "1.36",
        "@",
        "sha256:abc",
        "sha256",
        "é",
        "",
        "a",
    ];

    proptest! {
        #![proptest_config(config(512))]

        /// Any reference splits or is refused naming itself, never a panic; a split joins
        /// back to the reference with its separator, and parses again to the same parts.
        #[test]
        fn references_split_and_join_back(image in prop_oneof![text(), joined(PIECES, 7)]) {
            match ImageRef::parse(&image) {
                Ok(r) => {
                    let joined = match &r.tag {
                        None => r.repository.clone(),
                        Some(tag) => {
                            let digest = r.is_digest() || image.ends_with(&format!("@{tag}"));
                            let sep = if digest { '@' } else { ':' };
                            format!("{}{sep}{tag}", r.repository)
                        }
                    };
                    prop_assert_eq!(&joined, &image);
                    prop_assert_eq!(ImageRef::parse(&joined), Ok(r.clone()));
                    let policy = r.default_pull_policy();
                    prop_assert!(matches!(policy, PullPolicy::Always | PullPolicy::IfNotPresent));
                }
                Err(e) => prop_assert_eq!(e.image, image),
            }
        }
    }
}
