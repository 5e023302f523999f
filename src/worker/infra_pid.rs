//! A flow run's `infrastructure_pid` as the Docker worker writes it: the Engine's `base_url`
//! (as docker-py names it: `http+docker://localhost`, `https://host:2376`) and the container
//! id, joined by `:`. The Python worker writes the same, so either worker can tell from a pid
//! whether a container is on its own Docker host.

use std::fmt;

/// Where a run's container is: which Engine, which container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfrastructurePid {
    base_url: String,
    container_id: String,
}

impl InfrastructurePid {
    /// The pid of `container_id` on the Engine at `base_url`.
    pub fn new(base_url: &str, container_id: &str) -> Self {
        Self {
            base_url: base_url.to_owned(),
            container_id: container_id.to_owned(),
        }
    }

    /// Reads a pid; `None` when it has no `:` or an empty part. The container id is after the
    /// last `:` (a base URL has colons of its own; a container id never does).
    pub fn parse(text: &str) -> Option<Self> {
        let (base_url, container_id) = text.rsplit_once(':')?;
        (!base_url.is_empty() && !container_id.is_empty())
            .then(|| Self::new(base_url, container_id))
    }

    /// Whether the container is on the Engine at `base_url`.
    pub fn is_on(&self, base_url: &str) -> bool {
        self.base_url == base_url
    }

    /// Whether the pid names an Engine only relative to the machine that wrote it — a unix
    /// socket or named pipe (`http+docker://localhost`, as docker-py names every one), SSH, or
    /// a loopback address — so the same pid written on two machines means two Engines.
    pub fn is_machine_local(&self) -> bool {
        let host = self
            .base_url
            .split_once("://")
            .map_or(self.base_url.as_str(), |(_, rest)| rest);
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        self.base_url.starts_with("http+docker://")
            || matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    }

    /// The container's id.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }
}

impl fmt::Display for InfrastructurePid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.base_url, self.container_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        let pid = InfrastructurePid::new("http+docker://localhost", "abc123");
        assert_eq!(pid.to_string(), "http+docker://localhost:abc123");
        assert_eq!(
            InfrastructurePid::parse(&pid.to_string()),
            Some(pid.clone())
        );
        let tcp = InfrastructurePid::parse("https://10.0.0.2:2376:def").expect("parsed");
        assert!(tcp.is_on("https://10.0.0.2:2376"));
        assert!(!tcp.is_on("http+docker://localhost"));
        assert_eq!(tcp.container_id(), "def");
    }

    #[test]
    fn a_socket_or_loopback_engine_is_local_to_its_machine() {
        for local in [
            "http+docker://localhost:a",
            "http+docker://localnpipe:a",
            "http+docker://ssh:a",
            "http://127.0.0.1:2375:a",
            "https://localhost:2376:a",
            "http://[::1]:2375:a",
        ] {
            let pid = InfrastructurePid::parse(local).expect("parsed");
            assert!(pid.is_machine_local(), "{local}");
        }
        for remote in ["https://10.0.0.2:2376:a", "http://docker.internal:2375:a"] {
            let pid = InfrastructurePid::parse(remote).expect("parsed");
            assert!(!pid.is_machine_local(), "{remote}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_pid() {
        for bad in ["", "abc", ":abc", "http+docker://localhost:"] {
            assert_eq!(InfrastructurePid::parse(bad), None, "{bad:?}");
        }
    }
}
