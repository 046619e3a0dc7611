//! Upstream connections held by HTTP/1.1 client connections.
//!
//! An HTTP/1.1 client connection sends one request at a time, so it can hold
//! one HTTP/1.1 upstream connection for as long as it lives and send every
//! request straight down it. That skips the shared pool's checkout and
//! check-in, which on the request path cost more than the proxying itself
//! (`benches/load.sh`, BENCHMARKS.md). Upstream connections stay pooled:
//! one is taken from the idle list when a client connection first forwards,
//! and goes back to it when the client connection ends, if it is idle and
//! open. Idle ones are closed after [`POOL_IDLE_TIMEOUT`], at most
//! [`POOL_MAX_IDLE_PER_HOST`] are kept per upstream.
//!
//! HTTP/2 client connections multiplex, so they keep the shared pooled
//! client (which may speak h2 upstream).

use std::error::Error as StdError;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower_service::Service;

use super::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};
use crate::route::Upstream;

type Sender = http1::SendRequest<Full<Bytes>>;

/// How often idle connections past [`POOL_IDLE_TIMEOUT`] are closed.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// Why a request could not be sent on a held connection.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(#[source] Box<dyn StdError + Send + Sync>),
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

impl SendError {
    /// Whether the upstream could not be reached within `connect_timeout`.
    pub fn is_connect_timeout(&self) -> bool {
        match self {
            SendError::Connect(err) => super::timed_out(err.as_ref()),
            SendError::Handshake(_) | SendError::Request(_) => false,
        }
    }
}

/// The idle upstream connections, by scheme and authority.
#[derive(Clone)]
pub struct HeldPool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    idle: Mutex<Vec<Idle>>,
    reaper_started: std::sync::atomic::AtomicBool,
}

/// An upstream connection and what it was opened to.
struct Conn {
    scheme: Scheme,
    authority: Authority,
    /// The `Host` its requests carry.
    host: HeaderValue,
    sender: Sender,
}

impl Conn {
    fn goes_to(&self, upstream: &Upstream) -> bool {
        self.scheme == upstream.scheme && self.authority == upstream.authority
    }

    /// Idle and open: it can carry another client connection's requests.
    fn reusable(&self) -> bool {
        !self.sender.is_closed() && self.sender.is_ready()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The upstream connection one client connection holds. Dropping it (when
/// the client connection ends) returns the connection to the idle list.
#[derive(Default)]
pub struct Slot {
    held: Mutex<Option<(Conn, Weak<Inner>)>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let held = self
            .held
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((conn, pool)) = held {
            if let Some(pool) = pool.upgrade() {
                pool.put(conn);
            }
        }
    }
}

impl HeldPool {
    /// A pool that opens connections with `connector` (HTTP/1.1 only).
    pub fn new(connector: HttpsConnector<HttpConnector>) -> HeldPool {
        HeldPool {
            inner: Arc::new(Inner {
                connector,
                idle: Mutex::new(Vec::new()),
                reaper_started: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Idle connections kept now.
    pub fn idle(&self) -> usize {
        self.inner.lock_idle().len()
    }

    /// Sends `request` (its URI in origin form) to `upstream` on the
    /// connection `slot` holds, taking one from the idle list or opening one
    /// if it holds none for that upstream. A request that a reused
    /// connection closed before sending is sent again once, on a new one.
    pub async fn send(
        &self,
        slot: &Slot,
        upstream: &Upstream,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        let held = {
            let mut held = slot.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.take() {
                Some((conn, _)) if conn.goes_to(upstream) && !conn.sender.is_closed() => Some(conn),
                Some((other, _)) => {
                    // Another upstream (the client moved to another route):
                    // give it back for others.
                    self.inner.put(other);
                    None
                }
                None => None,
            }
        };
        let mut reused = true;
        let mut conn = match held.or_else(|| self.inner.checkout(upstream)) {
            Some(conn) => conn,
            None => {
                reused = false;
                self.inner.connect(upstream).await?
            }
        };
        request
            .headers_mut()
            .insert(header::HOST, conn.host.clone());
        loop {
            let ready = conn.sender.ready().await;
            let sent = match ready {
                Ok(()) => conn.sender.try_send_request(request).await,
                Err(err) if reused => {
                    tracing::debug!(error = %err, "held upstream connection closed; opening another");
                    reused = false;
                    conn = self.inner.connect(upstream).await?;
                    continue;
                }
                Err(err) => return Err(SendError::Request(err)),
            };
            match sent {
                Ok(response) => {
                    let mut held = slot.held.lock().unwrap_or_else(|p| p.into_inner());
                    *held = Some((conn, Arc::downgrade(&self.inner)));
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => {
                        tracing::debug!(error = %err.error(), "held upstream connection closed before sending; opening another");
                        request = unsent;
                        reused = false;
                        conn = self.inner.connect(upstream).await?;
                    }
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently idled open connection to `upstream`.
    fn checkout(&self, upstream: &Upstream) -> Option<Conn> {
        let mut idle = self.lock_idle();
        let now = Instant::now();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if !idle[i].conn.goes_to(upstream) {
                continue;
            }
            let entry = idle.swap_remove(i);
            if entry.conn.reusable() && now.duration_since(entry.since) < POOL_IDLE_TIMEOUT {
                return Some(entry.conn);
            }
            // Closed or expired: dropping it closes it.
            i = i.min(idle.len());
        }
        None
    }

    /// Keeps `conn` for another client connection if it is idle and open.
    fn put(self: &Arc<Self>, conn: Conn) {
        if !conn.reusable() {
            return;
        }
        self.start_reaper();
        let mut idle = self.lock_idle();
        let same = idle.iter().filter(|e| e.conn.goes_to_conn(&conn)).count();
        if same >= POOL_MAX_IDLE_PER_HOST {
            // The oldest one to that upstream makes room.
            if let Some(oldest) = idle.iter().position(|e| e.conn.goes_to_conn(&conn)) {
                idle.remove(oldest);
            }
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes idle connections that expired or that their upstream closed.
    fn reap(&self) {
        let now = Instant::now();
        self.lock_idle()
            .retain(|e| e.conn.reusable() && now.duration_since(e.since) < POOL_IDLE_TIMEOUT);
    }

    fn start_reaper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.reaper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                match pool.upgrade() {
                    Some(pool) => pool.reap(),
                    None => return,
                }
            }
        });
    }

    async fn connect(&self, upstream: &Upstream) -> Result<Conn, SendError> {
        let uri = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|err| SendError::Connect(err.into()))?;
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "upstream connection ended with an error");
            }
        });
        Ok(Conn {
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
            host: host_header(&upstream.scheme, &upstream.authority),
            sender,
        })
    }
}

impl Conn {
    fn goes_to_conn(&self, other: &Conn) -> bool {
        self.scheme == other.scheme && self.authority == other.authority
    }
}

/// `Host` for an upstream: its authority, without the scheme's default port.
fn host_header(scheme: &Scheme, authority: &Authority) -> HeaderValue {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let text = match authority.port_u16() {
        Some(port) if port == default_port => authority.host(),
        _ => authority.as_str(),
    };
    // An `Authority` holds only characters a header value may; the fallback
    // is never taken.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_leaves_out_the_default_port_only() {
        let host = |scheme: Scheme, authority: &'static str| {
            host_header(&scheme, &Authority::from_static(authority))
        };
        assert_eq!(
            host(Scheme::HTTPS, "cdn.contentstack.io:443"),
            "cdn.contentstack.io"
        );
        assert_eq!(
            host(Scheme::HTTPS, "cdn.contentstack.io"),
            "cdn.contentstack.io"
        );
        assert_eq!(host(Scheme::HTTP, "127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host(Scheme::HTTP, "127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host(Scheme::HTTPS, "origin:8443"), "origin:8443");
    }
}
