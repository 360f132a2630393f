//! Waiting between attempts: one reconnect [`Backoff`] for every loop that retries a
//! dependency (the schema task, the feeds, the Redis repair queue), [`jitter`] to spread
//! timers and TTLs apart, and [`ticker`] for every periodic loop. Knows nothing about what is
//! retried.
//!
//! The exponential schedule comes from the `backon` crate; this module only fixes how syncar
//! uses it: jittered, never past its maximum, and reset after a success.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Jittered exponential backoff between `min` and `max`.
///
/// Each pause is drawn from `[d, 2d)`, where `d` doubles from `min / 2` up to `max / 2`, so
/// pauses never exceed `max` and instances retrying together drift apart.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    schedule: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// A schedule whose first pause is about `min` (`[min/2, min)`) and whose pauses never
    /// exceed `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min / 2)
            .with_max_delay((max / 2).max(min / 2))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            schedule: builder.build(),
            builder,
            max,
        }
    }

    /// The next pause: longer than the last, up to the maximum.
    pub fn next_pause(&mut self) -> Duration {
        self.schedule.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts over from the shortest pause (after a success).
    pub fn reset(&mut self) {
        self.schedule = self.builder.build();
    }
}

/// `d` spread uniformly by +-`fraction`, so entries written together expire apart.
pub fn jitter(d: Duration, fraction: f64) -> Duration {
    if fraction <= 0.0 {
        return d;
    }
    let factor = 1.0 + fraction * (fastrand::f64() * 2.0 - 1.0);
    d.mul_f64(factor.max(0.0))
}

/// A tick every `period`, the first at once. After a stall (a slow poll, a busy runtime) the
/// next tick comes a whole `period` later rather than the missed ones in a burst
/// ([`tokio::time::MissedTickBehavior::Delay`]): heartbeats and polls sent back to back
/// would prove nothing more than one.
pub fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_fraction() {
        let base = Duration::from_secs(10);
        for _ in 0..1000 {
            let d = jitter(base, 0.1);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        assert_eq!(jitter(base, 0.0), base);
    }

    #[test]
    fn pauses_grow_never_pass_the_maximum_and_start_over_on_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..100 {
            let mut b = Backoff::new(min, max);
            let first = b.next_pause();
            assert!(first >= min / 2 && first < min, "{first:?}");
            let pauses: Vec<_> = (0..20).map(|_| b.next_pause()).collect();
            assert!(pauses.iter().all(|p| *p <= max), "{pauses:?}");
            assert!(pauses[19] >= max / 2, "reaches the top: {pauses:?}");
            b.reset();
            assert!(b.next_pause() < min);
        }
    }
}
