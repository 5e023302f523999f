//! GPU partitioning (`--gpu-devices`): a run whose job asks for `gpus: N` gets N device ids of
//! its own in its `DeviceRequests` instead of a count Docker resolves (which puts every run on
//! the same first GPUs), and holds them until its container is done. A run that finds none
//! free waits its turn, claimed, instead of crashing.

use std::time::Duration;

use serde_json::{Value, json};

use super::super::Worker;
use super::super::admission::GpuLease;
use super::super::registry::RunGuard;
use crate::docker::DockerError;
use crate::job::ContainerSpec;

/// How often a run waiting for GPUs checks whether it was cancelled meanwhile.
const CANCEL_CHECK: Duration = Duration::from_secs(1);

/// How a wait for GPUs ended without a lease.
#[derive(Debug)]
pub(crate) enum NoLease {
    /// The run was cancelled while waiting.
    Cancelled,
    /// The worker is stopping.
    Stopping,
    /// The job asks for more than this worker has.
    TooMany(DockerError),
}

/// Whether a device request is for GPUs (its capabilities name `gpu`).
fn is_gpu_request(request: &Value) -> bool {
    request["Capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|set| set.as_array().into_iter().flatten())
        .any(|c| c.as_str() == Some("gpu"))
}

/// How many devices the spec's GPU requests leave to Docker to pick: their counts (`-1` = all
/// of the worker's). Requests naming device ids are the job's own choice and not counted.
pub(crate) fn requested(spec: &ContainerSpec, pool_size: usize) -> usize {
    let Some(requests) = spec
        .host_config_overrides
        .get("DeviceRequests")
        .and_then(Value::as_array)
    else {
        return 0;
    };
    requests
        .iter()
        .filter(|r| is_gpu_request(r))
        .filter(|r| r["DeviceIDs"].as_array().is_none_or(Vec::is_empty))
        .map(|r| match r["Count"].as_i64() {
            Some(-1) => pool_size,
            Some(n) => usize::try_from(n).unwrap_or(0),
            None => 0,
        })
        .sum()
}

/// Gives the spec's counted GPU requests the leased device ids, in order.
pub(crate) fn assign(spec: &mut ContainerSpec, ids: &[String], pool_size: usize) {
    let Some(requests) = spec
        .host_config_overrides
        .get_mut("DeviceRequests")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    let mut free = ids.iter();
    for request in requests.iter_mut().filter(|r| is_gpu_request(r)) {
        if request["DeviceIDs"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
        {
            continue;
        }
        let count = match request["Count"].as_i64() {
            Some(-1) => pool_size,
            Some(n) => usize::try_from(n).unwrap_or(0),
            None => 0,
        };
        let mine: Vec<&String> = free.by_ref().take(count).collect();
        if let Some(object) = request.as_object_mut() {
            object.insert("Count".into(), json!(0));
            object.insert("DeviceIDs".into(), json!(mine));
        }
    }
}

/// Leases the GPUs the spec asks for and writes their ids into it; `Ok(None)` when the worker
/// does not partition GPUs or the job asks for none.
pub(crate) async fn reserve(
    worker: &Worker,
    guard: &RunGuard,
    spec: &mut ContainerSpec,
) -> Result<Option<GpuLease>, NoLease> {
    let pool = &worker.registry.gpus;
    if !pool.is_enabled() {
        return Ok(None);
    }
    let count = requested(spec, pool.len());
    if count == 0 {
        return Ok(None);
    }
    if count > pool.len() {
        return Err(NoLease::TooMany(DockerError::InvalidArgument {
            message: format!(
                "the job asks for {count} GPUs, but this worker hands out {} (--gpu-devices)",
                pool.len()
            ),
        }));
    }
    let acquiring = pool.acquire(count);
    tokio::pin!(acquiring);
    let mut told = false;
    let mut check = tokio::time::interval(CANCEL_CHECK);
    loop {
        tokio::select! {
            // A lease free at once is taken without a "waiting" line.
            biased;
            lease = &mut acquiring => {
                let Some(lease) = lease else {
                    return Err(NoLease::Stopping);
                };
                assign(spec, &lease.device_ids(), pool.len());
                return Ok(Some(lease));
            }
            _ = check.tick() => {
                if guard.cancel_requested() {
                    return Err(NoLease::Cancelled);
                }
                if !told {
                    told = true;
                    worker.out.logs.info(
                        guard.run_id(),
                        format!("Waiting for {count} of this worker's {} GPUs to be free", pool.len()),
                    );
                }
            }
            () = worker.lifetime.stop.cancelled() => return Err(NoLease::Stopping),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(requests: Value) -> ContainerSpec {
        let mut spec = crate::job::ContainerSpec::for_tests("local/busybox:dw");
        spec.host_config_overrides
            .insert("DeviceRequests".into(), requests);
        spec
    }

    #[test]
    fn counted_gpu_requests_get_device_ids_and_explicit_ones_are_left() {
        let mut spec = spec_with(json!([
            {"Driver": "", "Count": 2, "Capabilities": [["gpu"]], "Options": {}},
            {"Driver": "", "Count": 0, "DeviceIDs": ["7"], "Capabilities": [["gpu"]]},
            {"Driver": "other", "Count": 1, "Capabilities": [["tpu"]]},
        ]));
        assert_eq!(requested(&spec, 4), 2);
        assign(&mut spec, &["1".into(), "3".into()], 4);
        let requests = &spec.host_config_overrides["DeviceRequests"];
        assert_eq!(requests[0]["DeviceIDs"], json!(["1", "3"]));
        assert_eq!(requests[0]["Count"], json!(0));
        assert_eq!(requests[1]["DeviceIDs"], json!(["7"]));
        assert_eq!(requests[2]["Count"], json!(1), "not a GPU request");
    }

    #[test]
    fn all_means_every_device_of_the_worker() {
        let spec = spec_with(json!([{"Count": -1, "Capabilities": [["gpu"]]}]));
        assert_eq!(requested(&spec, 4), 4);
        assert_eq!(requested(&ContainerSpec::for_tests("x"), 4), 0);
    }
}
