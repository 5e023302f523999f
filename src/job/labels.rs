//! Docker label keys from Prefect label keys (`prefect.io/flow-run-id` → `io.prefect.flow-run-id`),
//! and the keys of the labels this worker puts on every container, in one place: the worker
//! finds its containers by them (reattachment, cancellation, garbage collection), so a key
//! spelled twice could drift.
//!
//! Pure.

/// The flow run's id; also the label no two containers on a host may share.
pub const FLOW_RUN_ID: &str = "io.prefect.flow-run-id";
/// The flow run's name.
pub const FLOW_RUN_NAME: &str = "io.prefect.flow-run-name";
/// The Prefect release this worker reproduces.
pub const VERSION: &str = "io.prefect.version";
/// The work pool's name.
pub const WORK_POOL_NAME: &str = "io.prefect.work-pool-name";
/// The work pool's id.
pub const WORK_POOL_ID: &str = "io.prefect.work-pool-id";
/// The name of the worker that created the container.
pub const WORKER_NAME: &str = "io.prefect.worker-name";
/// The flow's id, when known.
pub const FLOW_ID: &str = "io.prefect.flow-id";
/// The flow's name, when known.
pub const FLOW_NAME: &str = "io.prefect.flow-name";
/// The deployment's id, when the run has one.
pub const DEPLOYMENT_ID: &str = "io.prefect.deployment-id";
/// The deployment's name, when the run has one.
pub const DEPLOYMENT_NAME: &str = "io.prefect.deployment-name";
/// When the deployment was last updated (Python `isoformat()`), when the run has one.
pub const DEPLOYMENT_UPDATED: &str = "io.prefect.deployment-updated";
/// The job's `max_runtime` in whole seconds, on containers that have one, so a worker that
/// adopts the container after a restart still enforces it. This worker's own label, not
/// Prefect's.
pub const MAX_RUNTIME: &str = "dev.docker-worker.max-runtime-seconds";
/// `true` on containers whose output is forwarded to their run's logs (the job variable
/// `stream_output_to_api` or the worker's `--logs-to-api`), so a worker that adopts the
/// container after a restart goes on forwarding it. This worker's own label.
pub const LOGS_TO_API: &str = "dev.docker-worker.logs-to-api";

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

    #[test]
    fn constants_are_the_docker_form_of_prefects_keys() {
        for (constant, prefect) in [
            (FLOW_RUN_ID, "prefect.io/flow-run-id"),
            (FLOW_RUN_NAME, "prefect.io/flow-run-name"),
            (VERSION, "prefect.io/version"),
            (WORK_POOL_NAME, "prefect.io/work-pool-name"),
            (WORK_POOL_ID, "prefect.io/work-pool-id"),
            (WORKER_NAME, "prefect.io/worker-name"),
            (FLOW_ID, "prefect.io/flow-id"),
            (FLOW_NAME, "prefect.io/flow-name"),
            (DEPLOYMENT_ID, "prefect.io/deployment-id"),
            (DEPLOYMENT_NAME, "prefect.io/deployment-name"),
            (DEPLOYMENT_UPDATED, "prefect.io/deployment-updated"),
        ] {
            assert_eq!(docker_label_key(prefect), constant);
            // Already in Docker's form: converting again changes nothing.
            assert_eq!(docker_label_key(constant), constant);
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::docker_label_key;
    use crate::job::strategies::{config, text};

    proptest! {
        #![proptest_config(config(256))]

        /// Any key converts: a key without `/` is kept, and the conversion only reorders
        /// the domain's parts and turns the first `/` into a `.` (the length is kept).
        #[test]
        fn any_key_converts(key in text()) {
            let docker = docker_label_key(&key);
            prop_assert_eq!(docker.len(), key.len());
            if !key.contains('/') {
                prop_assert_eq!(docker, key);
            } else {
                prop_assert_eq!(docker.matches('/').count() + 1, key.matches('/').count());
            }
        }
    }
}
