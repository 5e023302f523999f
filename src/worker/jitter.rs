//! Jittered loop intervals, so many workers on one pool do not poll in lockstep.

use std::time::Duration;

/// Prefect's clamped Poisson interval: an exponential draw with mean `average`, kept within
/// `[0.752, 1.3] × average` (what the reference's poll gaps show: 7.5–13 s for 10 s).
pub fn clamped_poisson_interval(average: Duration) -> Duration {
    let mean = average.as_secs_f64();
    if mean <= 0.0 {
        return Duration::ZERO;
    }
    let cdf = |x: f64| 1.0 - (-x / mean).exp();
    let (lo, hi) = (cdf(0.752 * mean), cdf(1.3 * mean));
    let u = lo + rand::random::<f64>() * (hi - lo);
    Duration::from_secs_f64(-mean * (1.0 - u).ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_bounds() {
        for _ in 0..1000 {
            let d = clamped_poisson_interval(Duration::from_secs(10)).as_secs_f64();
            assert!((7.52 - 1e-9..=13.0 + 1e-9).contains(&d), "{d}");
        }
        assert_eq!(clamped_poisson_interval(Duration::ZERO), Duration::ZERO);
    }
}
