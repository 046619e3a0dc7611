//! This node's connection to Redis: one multiplexed connection manager
//! (it reconnects by itself), every call bounded by a timeout, and whether
//! Redis answers, since when it does not.
//!
//! Nothing on the request path calls into here: only the cluster's
//! background tasks and the admin API do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script};
use tokio::time::Instant;

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The Redis connection and its health.
pub struct Link {
    manager: ConnectionManager,
    client: redis::Client,
    timeout: Duration,
    up: AtomicBool,
    /// When Redis last answered (or the link was made).
    last_ok: Mutex<Instant>,
}

impl Link {
    /// A link to `url` that connects on first use; `timeout` bounds every call.
    pub fn new(url: &str, timeout: Duration) -> Result<Link, LinkError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Link {
            manager,
            client,
            timeout,
            up: AtomicBool::new(false),
            last_ok: Mutex::new(Instant::now()),
        })
    }

    /// The client, for the pub/sub connection.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The timeout every call has.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the last call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How long Redis has not answered; zero while it does.
    pub fn down_for(&self) -> Duration {
        if self.is_up() {
            return Duration::ZERO;
        }
        self.lock_last_ok().elapsed()
    }

    fn lock_last_ok(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.last_ok
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the outcome of a call. Returns true when Redis just came back.
    pub fn record(&self, ok: bool) -> bool {
        if ok {
            *self.lock_last_ok() = Instant::now();
            !self.up.swap(true, Ordering::AcqRel)
        } else {
            if self.up.swap(false, Ordering::AcqRel) {
                *self.lock_last_ok() = Instant::now();
            }
            false
        }
    }

    /// Runs `script` with `keys` and `args`, within the timeout.
    pub async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, LinkError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.manager.clone();
        let result = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await;
        let result = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(LinkError::Redis(err)),
            Err(_) => Err(LinkError::Timeout(self.timeout)),
        };
        self.record(result.is_ok());
        result
    }

    /// PUBLISH `payload` on `channel`, within the timeout.
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<(), LinkError> {
        let mut conn = self.manager.clone();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        let result = tokio::time::timeout(self.timeout, cmd.query_async::<i64>(&mut conn)).await;
        let result = match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(LinkError::Redis(err)),
            Err(_) => Err(LinkError::Timeout(self.timeout)),
        };
        self.record(result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rediss_urls_are_built_with_tls_and_nothing_connects_early() {
        // Fails with "TLS feature not enabled" unless redis-rs has rustls.
        let link = Link::new("rediss://:pw@127.0.0.1:1/0", Duration::from_millis(100)).unwrap();
        assert!(!link.is_up());
        let script = Script::new("return 1");
        let started = Instant::now();
        let result = link.script::<i64>(&script, &[], &[]).await;
        assert!(result.is_err(), "nothing listens on port 1");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the call timeout holds"
        );
        assert!(!link.is_up());
    }
}
