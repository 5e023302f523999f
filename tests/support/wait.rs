//! Waiting for something to happen instead of sleeping and hoping it did: a condition is
//! checked every [`POLL_INTERVAL`] until it holds or a timeout passes. [`eventually`] is the
//! one to use in tests; it panics naming what it waited for (and what it last saw). The other
//! three are the same loop for helpers whose callers assert themselves ([`within`]) and for
//! code that cannot await: starting and stopping peers, `Drop` ([`eventually_blocking`],
//! [`within_blocking`]).
//!
//! A condition returns one of:
//! - `bool`: done when `true`;
//! - `Option<T>`: done with `T` when `Some`;
//! - `Result<T, E>`: done with `T` when `Ok`; an `Err` is what was seen instead, and the last
//!   one is printed if the wait times out (`Err(worker.output())` is a common choice).

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a condition is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What one check of a condition found: done (with a value), or not yet (with what it saw).
pub trait Check {
    /// What the wait returns once the condition holds.
    type Output;
    /// What a check that did not hold saw.
    type Seen;
    fn check(self) -> Result<Self::Output, Self::Seen>;
    /// The observation for a timeout's message, if there is one worth printing.
    fn describe(seen: &Self::Seen) -> Option<String>;
}

impl Check for bool {
    type Output = ();
    type Seen = ();
    fn check(self) -> Result<(), ()> {
        if self { Ok(()) } else { Err(()) }
    }
    fn describe(_: &()) -> Option<String> {
        None
    }
}

impl<T> Check for Option<T> {
    type Output = T;
    type Seen = ();
    fn check(self) -> Result<T, ()> {
        self.ok_or(())
    }
    fn describe(_: &()) -> Option<String> {
        None
    }
}

impl<T, E: Display> Check for Result<T, E> {
    type Output = T;
    type Seen = E;
    fn check(self) -> Result<T, E> {
        self
    }
    fn describe(seen: &E) -> Option<String> {
        Some(seen.to_string())
    }
}

/// Checks `condition` until it holds and returns what it yielded; panics with `what` (and the
/// last thing seen, for a `Result` condition) once `timeout` has passed.
///
/// ```ignore
/// let ids = eventually(Duration::from_secs(60), "the run's container", async || {
///     let ids = guard.containers();
///     if ids.is_empty() { Err(worker.output()) } else { Ok(ids) }
/// })
/// .await;
/// ```
pub async fn eventually<C: Check>(
    timeout: Duration,
    what: impl Display,
    condition: impl AsyncFnMut() -> C,
) -> C::Output {
    match within(timeout, condition).await {
        Ok(value) => value,
        Err(seen) => timed_out::<C>(timeout, &what, &seen),
    }
}

/// [`eventually`] without the panic: `Err` with the last thing seen once `timeout` has passed.
pub async fn within<C: Check>(
    timeout: Duration,
    mut condition: impl AsyncFnMut() -> C,
) -> Result<C::Output, C::Seen> {
    let deadline = Instant::now() + timeout;
    loop {
        match condition().await.check() {
            Ok(value) => return Ok(value),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// [`eventually`] for code that cannot await.
pub fn eventually_blocking<C: Check>(
    timeout: Duration,
    what: impl Display,
    condition: impl FnMut() -> C,
) -> C::Output {
    match within_blocking(timeout, condition) {
        Ok(value) => value,
        Err(seen) => timed_out::<C>(timeout, &what, &seen),
    }
}

/// [`within`] for code that cannot await.
pub fn within_blocking<C: Check>(
    timeout: Duration,
    mut condition: impl FnMut() -> C,
) -> Result<C::Output, C::Seen> {
    let deadline = Instant::now() + timeout;
    loop {
        match condition().check() {
            Ok(value) => return Ok(value),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

fn timed_out<C: Check>(timeout: Duration, what: &dyn Display, seen: &C::Seen) -> ! {
    match C::describe(seen) {
        Some(seen) => panic!("timed out after {timeout:?} waiting for {what}; last seen:\n{seen}"),
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
