//! When registries are synced: the poll loop and its backoff. (The CMA
//! request budget all stacks share lives beside the client that spends it,
//! in [`super::source`].)
//!
//! Failures back off exponentially with jitter; the loop is generic over the
//! sync step so that its timing can be tested with paused time.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::source::SyncError;

/// Longest wait between sync attempts after repeated failures.
pub const MAX_SYNC_BACKOFF: Duration = Duration::from_secs(300);
/// Jitter on every wait, so that stacks do not poll in step.
pub const JITTER: f64 = 0.2;

/// The wait after `failures` failures in a row: doubling from `interval` up
/// to [`MAX_SYNC_BACKOFF`] (or `interval`, if longer), never less than a
/// `Retry-After`. `unit` in `[0, 1)` picks the jitter.
pub fn backoff(
    interval: Duration,
    failures: u32,
    error: Option<&SyncError>,
    unit: f64,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let base = interval
        .saturating_mul(1 << exponent)
        .min(MAX_SYNC_BACKOFF.max(interval));
    let wait = jittered(base, unit);
    match error {
        Some(SyncError::RateLimited {
            retry_after: Some(retry_after),
        }) => wait.max(*retry_after),
        _ => wait,
    }
}

fn jittered(base: Duration, unit: f64) -> Duration {
    base.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0))
}

/// What one sync step reports to the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polled {
    /// Failures in a row, 0 after a success.
    pub failures: u32,
    /// The last failure, while failing.
    pub error: Option<SyncError>,
}

/// How a source is waited on after a failed sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Back off (the CMA: doubling, up to [`MAX_SYNC_BACKOFF`], `Retry-After`).
    BackOff,
    /// Try again at the usual interval (a local file: reading it costs
    /// nobody anything, and a fixed file should be picked up at once).
    Retry,
}

/// Runs `sync` now, then again every `interval` (with jitter), or, for a
/// source that backs off, after a backoff while it fails, until `shutdown`.
pub async fn poll_loop<F, Fut>(
    interval: Duration,
    on_failure: OnFailure,
    shutdown: CancellationToken,
    mut sync: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Polled>,
{
    loop {
        let polled = sync().await;
        let unit = rand::random::<f64>();
        let wait = if polled.failures == 0 || on_failure == OnFailure::Retry {
            jittered(interval, unit)
        } else {
            backoff(interval, polled.failures, polled.error.as_ref(), unit)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_honours_retry_after() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(10), 1, None, 0.5), s(10));
        assert_eq!(backoff(s(10), 2, None, 0.5), s(20));
        assert_eq!(backoff(s(10), 4, None, 0.5), s(80));
        assert_eq!(backoff(s(10), 30, None, 0.5), MAX_SYNC_BACKOFF);
        assert_eq!(
            backoff(s(600), 5, None, 0.5),
            s(600),
            "never below the interval's own cap"
        );
        assert_eq!(backoff(s(10), 1, None, 0.0), s(8));
        assert_eq!(backoff(s(10), 1, None, 1.0), s(12));
        let limited = SyncError::RateLimited {
            retry_after: Some(s(90)),
        };
        assert_eq!(backoff(s(10), 1, Some(&limited), 0.5), s(90));
    }

    /// Counts sync steps over ten minutes of paused time.
    async fn steps_in_ten_minutes(failing: bool, error: Option<SyncError>) -> u32 {
        steps(Duration::from_secs(10), OnFailure::BackOff, failing, error).await
    }

    /// Counts sync steps over ten minutes of paused time.
    async fn steps(
        interval: Duration,
        on_failure: OnFailure,
        failing: bool,
        error: Option<SyncError>,
    ) -> u32 {
        let calls = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let counter = Arc::clone(&calls);
        let run = poll_loop(interval, on_failure, shutdown.clone(), move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let error = error.clone();
            async move {
                Polled {
                    failures: if failing { n } else { 0 },
                    error,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(600), run).await;
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_polled_with_backoff() {
        let healthy = steps_in_ten_minutes(false, None).await;
        assert!((55..=70).contains(&healthy), "{healthy} polls when healthy");
        let outage = steps_in_ten_minutes(true, Some(SyncError::Status(500))).await;
        // 10, 20, 40, 80, 160 s, then every 300 s: about 7 in 600 s (jitter ±20%).
        assert!((5..=9).contains(&outage), "{outage} polls during an outage");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_tokens_file_is_read_again_every_interval() {
        let broken = SyncError::File {
            path: "tokens.json".into(),
            reason: "invalid JSON".into(),
        };
        let polls = steps(Duration::from_secs(1), OnFailure::Retry, true, Some(broken)).await;
        // Every second (±20%) for 600 s, not doubling up to 5 minutes.
        assert!(
            (500..=760).contains(&polls),
            "{polls} reads of a broken file"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_cma_is_asked_again_only_after_retry_after() {
        let limited = SyncError::RateLimited {
            retry_after: Some(Duration::from_secs(120)),
        };
        let polls = steps_in_ten_minutes(true, Some(limited)).await;
        assert!(
            (4..=6).contains(&polls),
            "{polls} polls under 429 with Retry-After: 120"
        );
    }
}
