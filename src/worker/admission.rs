//! Admission beyond `--limit`: how many submissions (pulls, creates and starts) are in flight
//! at once, which GPUs a run gets, and whether the host has memory left for another run. A
//! burst of due runs must not make a small host start everything at once, and runs that ask
//! for GPUs must not collide on one device.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The host's turns every pool's worker of the process shares: submissions in flight and GPUs
/// are the host's, so two pools served by one process must not each get their own.
#[derive(Debug, Clone)]
pub struct HostAdmission {
    pub(crate) submissions: Submissions,
    pub(crate) gpus: Arc<GpuPool>,
}

impl HostAdmission {
    /// `max_submissions` turns to submit at once (at least one) and these GPU device ids.
    #[must_use]
    pub fn new(max_submissions: usize, gpu_devices: &[String]) -> Self {
        Self {
            submissions: Submissions::new(max_submissions),
            gpus: GpuPool::new(gpu_devices),
        }
    }
}

/// The GPUs this worker hands out (`--gpu-devices`), each to one run at a time.
#[derive(Debug)]
pub(crate) struct GpuPool {
    /// Every device id, in the order given.
    all: Vec<String>,
    /// The ones no run holds.
    free: Mutex<BTreeSet<usize>>,
    /// One permit per free device; fair, so runs get devices in the order they asked.
    permits: Arc<Semaphore>,
}

/// Devices held by one run; dropping it gives them back.
#[derive(Debug)]
pub(crate) struct GpuLease {
    pool: Arc<GpuPool>,
    indices: Vec<usize>,
    _permits: Option<OwnedSemaphorePermit>,
}

impl GpuPool {
    /// A pool of these device ids (duplicates dropped).
    pub fn new(devices: &[String]) -> Arc<Self> {
        let mut all: Vec<String> = Vec::new();
        for d in devices {
            if !all.contains(d) {
                all.push(d.clone());
            }
        }
        Arc::new(Self {
            free: Mutex::new((0..all.len()).collect()),
            permits: Arc::new(Semaphore::new(all.len())),
            all,
        })
    }

    /// Whether the worker partitions GPUs at all.
    pub fn is_enabled(&self) -> bool {
        !self.all.is_empty()
    }

    /// How many devices there are.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Waits (in turn with other runs) until `count` devices are free and takes them. A count
    /// above the pool's size can never be met: `None`.
    pub async fn acquire(self: &Arc<Self>, count: usize) -> Option<GpuLease> {
        let wanted = u32::try_from(count).ok()?;
        if count > self.all.len() {
            return None;
        }
        let permits = Arc::clone(&self.permits)
            .acquire_many_owned(wanted)
            .await
            .ok()?;
        Some(self.take(count, Some(permits)))
    }

    /// Marks the devices a container found on the host already uses (adopted after a restart)
    /// as held, without waiting: they are in use whatever this process thinks.
    pub fn hold(self: &Arc<Self>, device_ids: &[String]) -> GpuLease {
        let indices: Vec<usize> = device_ids
            .iter()
            .filter_map(|id| self.all.iter().position(|d| d == id))
            .collect();
        let permits = u32::try_from(indices.len())
            .ok()
            .and_then(|n| Arc::clone(&self.permits).try_acquire_many_owned(n).ok());
        if let Ok(mut free) = self.free.lock() {
            for i in &indices {
                free.remove(i);
            }
        }
        GpuLease {
            pool: Arc::clone(self),
            indices,
            _permits: permits,
        }
    }

    fn take(self: &Arc<Self>, count: usize, permits: Option<OwnedSemaphorePermit>) -> GpuLease {
        let indices: Vec<usize> = match self.free.lock() {
            Ok(mut free) => {
                let taken: Vec<usize> = free.iter().copied().take(count).collect();
                for i in &taken {
                    free.remove(i);
                }
                taken
            }
            Err(_) => Vec::new(),
        };
        GpuLease {
            pool: Arc::clone(self),
            indices,
            _permits: permits,
        }
    }
}

impl GpuLease {
    /// The device ids held.
    pub fn device_ids(&self) -> Vec<String> {
        self.indices
            .iter()
            .filter_map(|i| self.pool.all.get(*i).cloned())
            .collect()
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.extend(self.indices.iter().copied());
        }
    }
}

/// Submissions in flight at once (`--max-concurrent-submissions`).
#[derive(Debug, Clone)]
pub(crate) struct Submissions {
    permits: Arc<Semaphore>,
}

impl Submissions {
    /// Up to `max` at once (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    /// Waits for a turn; the permit is held through the pull, create and start.
    pub async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).acquire_owned().await.ok()
    }
}

/// The host's available memory (`MemAvailable` of `/proc/meminfo`), in bytes; `None` where
/// it cannot be read.
pub(crate) fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    fn pool(n: usize) -> Arc<GpuPool> {
        GpuPool::new(&(0..n).map(|i| i.to_string()).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn each_run_gets_its_own_devices_and_gives_them_back() {
        let gpus = pool(4);
        let a = gpus.acquire(1).await.expect("a");
        let b = gpus.acquire(2).await.expect("b");
        assert_eq!(a.device_ids(), ["0"]);
        assert_eq!(b.device_ids(), ["1", "2"]);
        drop(a);
        let c = gpus.acquire(2).await.expect("c");
        let mut ids = c.device_ids();
        ids.sort();
        assert_eq!(ids, ["0", "3"]);
    }

    #[tokio::test]
    async fn a_run_that_finds_none_free_waits_in_turn() {
        let gpus = pool(2);
        let held = gpus.acquire(2).await.expect("all");
        let mut first = Box::pin(gpus.acquire(1));
        let mut second = Box::pin(gpus.acquire(1));
        assert!((&mut first).now_or_never().is_none(), "waits");
        assert!((&mut second).now_or_never().is_none(), "waits");
        drop(held);
        let first = first.await.expect("first in line");
        let second = second.await.expect("second");
        assert_ne!(first.device_ids(), second.device_ids());
    }

    #[tokio::test]
    async fn more_than_the_pool_is_never_met_and_adopted_devices_are_held() {
        let gpus = pool(2);
        assert!(gpus.acquire(3).await.is_none());
        let adopted = gpus.hold(&["1".into(), "unknown".into()]);
        assert_eq!(adopted.device_ids(), ["1"]);
        let next = gpus.acquire(1).await.expect("the other one");
        assert_eq!(next.device_ids(), ["0"]);
        assert!(gpus.acquire(1).now_or_never().is_none(), "none left");
    }

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("nothing"), None);
        assert!(
            available_memory().is_some_and(|m| m > 0),
            "this host has /proc"
        );
    }
}
