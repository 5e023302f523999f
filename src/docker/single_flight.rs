//! Single-flight: concurrent callers asking for the same key share one execution and its
//! result, so twenty runs that need the same image cause one pull, not twenty. Knows nothing of
//! Docker; the runtime keys it by image, platform and registry identity.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};

type Flight<T> = Shared<BoxFuture<'static, T>>;

/// In-flight executions by key. Cheap to clone; clones share the flights.
pub struct SingleFlight<T: Clone> {
    flights: Arc<Mutex<HashMap<String, Flight<T>>>>,
}

impl<T: Clone> Clone for SingleFlight<T> {
    fn clone(&self) -> Self {
        Self {
            flights: Arc::clone(&self.flights),
        }
    }
}

impl<T: Clone> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Clone> std::fmt::Debug for SingleFlight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.flights.lock().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("SingleFlight")
            .field("in_flight", &n)
            .finish()
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// Runs `start()` for `key` unless a run for it is already in flight, in which case this
    /// waits for that one. Returns the result and whether this call started the execution.
    /// The execution goes on while anyone still waits for it, even if its starter was dropped.
    pub async fn run<F>(&self, key: &str, start: impl FnOnce() -> F) -> (T, bool)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (flight, leader) = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = start().boxed().shared();
                    flights.insert(key.to_owned(), flight.clone());
                    (flight, true)
                }
            }
        };
        let result = flight.clone().await;
        // The first waiter back removes the finished flight, so the next call starts afresh.
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(key).is_some_and(|f| f.ptr_eq(&flight)) {
            flights.remove(key);
        }
        (result, leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_execution_and_its_result() {
        let flights: SingleFlight<Result<u32, String>> = SingleFlight::default();
        let starts = Arc::new(AtomicUsize::new(0));
        let calls = (0..10).map(|_| {
            let flights = flights.clone();
            let starts = Arc::clone(&starts);
            tokio::spawn(async move {
                flights
                    .run("img", || async move {
                        starts.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err::<u32, _>("denied".to_owned())
                    })
                    .await
            })
        });
        let results = futures_util::future::join_all(calls).await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        let leaders = results.iter().filter(|r| r.as_ref().unwrap().1).count();
        assert_eq!(leaders, 1);
        for r in results {
            assert_eq!(r.unwrap().0, Err("denied".to_owned()));
        }
        // Finished flights are forgotten: the next call runs again.
        let (again, leader) = flights.run("img", || async { Ok(7) }).await;
        assert_eq!((again, leader), (Ok(7), true));
    }

    #[tokio::test]
    async fn different_keys_run_separately() {
        let flights: SingleFlight<u32> = SingleFlight::default();
        let (a, b) = tokio::join!(
            flights.run("a", || async { 1 }),
            flights.run("b", || async { 2 })
        );
        assert_eq!((a, b), ((1, true), (2, true)));
    }

    #[tokio::test]
    async fn a_dropped_starter_does_not_strand_its_waiters() {
        let flights: SingleFlight<u32> = SingleFlight::default();
        let starter = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run("k", || async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        5
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", || async { 99 }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        starter.abort();
        assert_eq!(waiter.await.unwrap(), (5, false));
    }
}
