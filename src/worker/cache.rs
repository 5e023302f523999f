//! A small time-limited cache for API objects many runs share (a burst of runs from one
//! deployment reads its deployment and flow once, not once per run), so a busy SQLite server
//! gets fewer calls. Entries live for a few seconds: a changed deployment is seen by the
//! next runs almost at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Values by key, each kept for `ttl` after it was stored.
#[derive(Debug)]
pub(crate) struct TtlCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Arc<V>)>>,
    /// One fetch per key at a time; `true` inside once a fetch of that key failed.
    fetches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<bool>>>>,
}

impl<V> TtlCache<V> {
    /// An empty cache whose entries expire after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
        }
    }

    /// The value for `key`, from the cache or from `fetch`. The runs of a burst that all miss
    /// wait for the first one's fetch instead of each asking the API (25 runs of one
    /// deployment: one read, not 25). Nothing found (`Ok(None)`) is not cached; after a failed
    /// fetch the waiting ones fetch for themselves, at once rather than one after another.
    pub async fn get_or_fetch<E, F, Fut>(&self, key: &str, fetch: F) -> Result<Option<Arc<V>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
    {
        if let Some(v) = self.get(key) {
            return Ok(Some(v));
        }
        let Some(gate) = self.fetch_gate(key) else {
            return fetch().await.map(|v| v.map(|v| self.put(key, v)));
        };
        let mut failed = gate.lock().await;
        let result = if let Some(v) = self.get(key) {
            Ok(Some(v))
        } else if *failed {
            drop(failed);
            fetch().await.map(|v| v.map(|v| self.put(key, v)))
        } else {
            let result = fetch().await.map(|v| v.map(|v| self.put(key, v)));
            *failed = result.is_err();
            drop(failed);
            result
        };
        self.release_gate(key, &gate);
        result
    }

    fn fetch_gate(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<bool>>> {
        let mut fetches = self.fetches.lock().ok()?;
        Some(Arc::clone(fetches.entry(key.to_owned()).or_default()))
    }

    /// Forgets the key's gate once no one else holds it.
    fn release_gate(&self, key: &str, gate: &Arc<tokio::sync::Mutex<bool>>) {
        if let Ok(mut fetches) = self.fetches.lock()
            && Arc::strong_count(gate) <= 2
            && fetches.get(key).is_some_and(|g| Arc::ptr_eq(g, gate))
        {
            fetches.remove(key);
        }
    }

    /// The value for `key` if it was stored less than `ttl` ago.
    pub fn get(&self, key: &str) -> Option<Arc<V>> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| Arc::clone(v))
    }

    /// Stores a value (and forgets expired ones, so the map stays small).
    pub fn put(&self, key: &str, value: V) -> Arc<V> {
        let value = Arc::new(value);
        if let Ok(mut entries) = self.entries.lock() {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            entries.insert(key.to_owned(), (Instant::now(), Arc::clone(&value)));
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_misses_fetch_once() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let cache = Arc::new(TtlCache::new(Duration::from_secs(60)));
        let fetched = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (cache, fetched) = (Arc::clone(&cache), Arc::clone(&fetched));
                tokio::spawn(async move {
                    cache
                        .get_or_fetch("d", || async {
                            fetched.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok::<_, ()>(Some(7))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().as_deref(), Some(&7));
        }
        assert_eq!(fetched.load(Ordering::SeqCst), 1);
        assert!(cache.fetches.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn after_a_failed_fetch_each_waiter_fetches_and_missing_is_not_cached() {
        let cache = TtlCache::<u32>::new(Duration::from_secs(60));
        assert_eq!(
            cache.get_or_fetch("d", || async { Err("503") }).await,
            Err("503")
        );
        let none = cache
            .get_or_fetch("d", || async { Ok::<_, ()>(None) })
            .await;
        assert_eq!(none, Ok(None));
        let some = cache
            .get_or_fetch("d", || async { Ok::<_, ()>(Some(1)) })
            .await;
        assert_eq!(some.unwrap().as_deref(), Some(&1));
    }

    #[test]
    fn entries_expire() {
        let cache = TtlCache::new(Duration::from_millis(50));
        cache.put("a", 1);
        assert_eq!(cache.get("a").as_deref(), Some(&1));
        assert_eq!(cache.get("b"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None);
    }
}
