//! The HTTP/1.1 upstream pool that HTTP/1.1 client requests go through.
//!
//! hyper-util's pooled client costs more per request than the proxying
//! itself on this path (`benches/load.sh`, BENCHMARKS.md): a checkout future,
//! a keyed map, waiters, a connect service. This pool is a LIFO list of idle
//! HTTP/1.1 connections per upstream behind one mutex. A request leases the
//! most recently idled connection (usually the one its client connection
//! used last) or opens one, and its response body gives the connection back
//! when it has been read to the end; a body cut off mid-way (client gone,
//! revocation, stall) closes it instead. Idle connections are closed after
//! [`POOL_IDLE_TIMEOUT`]; at most [`POOL_MAX_IDLE_PER_HOST`] are kept per
//! upstream, as in the shared pool.
//!
//! HTTP/2 client connections multiplex, so they keep the shared pooled
//! client, which may speak h2 upstream.
//!
//! Requests in flight per upstream are capped (`upstream.max_connections`):
//! each holds a permit until its response body is done, so connections in
//! use never exceed the cap. Past it a request waits up to `connect_timeout`
//! for a permit, then fails with [`SendError::Busy`] (503 `upstream_busy`).
//! Requests of the shared pooled client take their permit with
//! [`H1Pool::permit`], so the cap covers both paths.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower_service::Service;

use super::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};
use crate::route::Upstream;

type Sender = http1::SendRequest<Full<Bytes>>;

/// How often idle connections past [`POOL_IDLE_TIMEOUT`] are closed.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(#[source] Box<dyn StdError + Send + Sync>),
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Request(#[source] hyper::Error),
    #[error("upstream.max_connections in use for longer than connect_timeout")]
    Busy,
}

impl SendError {
    /// Whether the upstream could not be reached within `connect_timeout`.
    pub fn is_connect_timeout(&self) -> bool {
        match self {
            SendError::Connect(err) => super::timed_out(err.as_ref()),
            SendError::Handshake(_) | SendError::Request(_) | SendError::Busy => false,
        }
    }
}

/// The idle HTTP/1.1 upstream connections.
#[derive(Clone)]
pub struct H1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// Per upstream (there are few: one per route at most), its idle
    /// connections, the most recently idled last.
    idle: Mutex<Vec<IdleList>>,
    reaper_started: std::sync::atomic::AtomicBool,
    /// Requests in flight allowed per upstream, and how long to wait for one.
    max_in_flight: usize,
    wait: Duration,
    /// Per upstream, its permits (created with its first request).
    in_flight: Mutex<Vec<(Scheme, Authority, Arc<Semaphore>)>>,
}

/// A request's place among its upstream's `max_connections`; dropped when
/// the response body is done.
pub struct UpstreamPermit {
    _permit: OwnedSemaphorePermit,
}

struct IdleList {
    scheme: Scheme,
    authority: Authority,
    conns: Vec<Idle>,
}

impl IdleList {
    fn is_for(&self, scheme: &Scheme, authority: &Authority) -> bool {
        self.scheme == *scheme && self.authority == *authority
    }
}

/// An upstream connection and what it was opened to.
struct Conn {
    scheme: Scheme,
    authority: Authority,
    /// The `Host` its requests carry.
    host: HeaderValue,
    sender: Sender,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    /// Still open, and idle for less than [`POOL_IDLE_TIMEOUT`].
    fn usable(&self, now: Instant) -> bool {
        !self.conn.sender.is_closed() && now.duration_since(self.since) < POOL_IDLE_TIMEOUT
    }
}

/// A connection leased for one request; dropped, it closes.
/// [`Leased`] gives it back once the response body has been read whole.
pub struct Lease {
    conn: Conn,
    pool: Arc<Inner>,
    _permit: UpstreamPermit,
}

impl H1Pool {
    /// A pool that opens connections with `connector` (HTTP/1.1 only), with
    /// no practical cap on requests in flight.
    pub fn new(connector: HttpsConnector<HttpConnector>) -> H1Pool {
        H1Pool::with_limit(connector, Semaphore::MAX_PERMITS, Duration::ZERO)
    }

    /// A pool allowing `max_in_flight` requests per upstream; past it a
    /// request waits up to `wait` (the `connect_timeout`) for a permit.
    pub fn with_limit(
        connector: HttpsConnector<HttpConnector>,
        max_in_flight: usize,
        wait: Duration,
    ) -> H1Pool {
        H1Pool {
            inner: Arc::new(Inner {
                connector,
                idle: Mutex::new(Vec::new()),
                reaper_started: std::sync::atomic::AtomicBool::new(false),
                max_in_flight: max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
                wait,
                in_flight: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A place among `upstream`'s requests in flight, waiting up to the
    /// pool's `wait` for one: `Busy` past it.
    pub async fn permit(&self, upstream: &Upstream) -> Result<UpstreamPermit, SendError> {
        let semaphore = self.inner.semaphore(upstream);
        if let Ok(permit) = Arc::clone(&semaphore).try_acquire_owned() {
            return Ok(UpstreamPermit { _permit: permit });
        }
        match tokio::time::timeout(self.inner.wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(UpstreamPermit { _permit: permit }),
            Ok(Err(_)) | Err(_) => Err(SendError::Busy),
        }
    }

    /// Idle connections kept now that are still open.
    pub fn idle(&self) -> usize {
        let idle = self.inner.lock_idle();
        let open = idle.iter().flat_map(|list| &list.conns);
        open.filter(|e| !e.conn.sender.is_closed()).count()
    }

    /// Sends `request` (its URI in origin form) to `upstream` on an idle
    /// connection, or on a new one if there is none. A request that a reused
    /// connection closed before sending is sent again once, on a new one.
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let permit = self.permit(upstream).await?;
        let mut reused = true;
        let mut conn = match self.inner.checkout(upstream) {
            Some(conn) => conn,
            None => {
                reused = false;
                self.inner.connect_boxed(upstream).await?
            }
        };
        request
            .headers_mut()
            .insert(header::HOST, conn.host.clone());
        loop {
            // On failure: the request back if it was never written, and why.
            let (unsent, err) = match conn.sender.ready().await {
                Ok(()) => match conn.sender.try_send_request(request).await {
                    Ok(response) => {
                        let pool = Arc::clone(&self.inner);
                        let lease = Lease {
                            conn,
                            pool,
                            _permit: permit,
                        };
                        return Ok((response, lease));
                    }
                    Err(mut err) => (err.take_message(), err.into_error()),
                },
                Err(err) => (Some(request), err),
            };
            match unsent {
                Some(unsent) if reused => {
                    tracing::debug!(error = %err, "idle upstream connection closed before sending; opening another");
                    request = unsent;
                    reused = false;
                    conn = self.inner.connect_boxed(upstream).await?;
                }
                _ => return Err(SendError::Request(err)),
            }
        }
    }
}

/// A response body that gives its connection's [`Lease`] back to the pool
/// once it has been read to the end, and closes the connection if it is
/// dropped before.
pub struct Leased {
    inner: Incoming,
    lease: Option<Lease>,
    permit: Option<UpstreamPermit>,
}

impl Leased {
    /// `lease`: `None` for a body that did not come from this pool.
    pub fn new(inner: Incoming, lease: Option<Lease>) -> Self {
        Leased {
            inner,
            lease,
            permit: None,
        }
    }

    /// Holds `permit` (a request of the shared pooled client) until the body is done.
    pub fn holding(mut self, permit: Option<UpstreamPermit>) -> Self {
        self.permit = permit;
        self
    }

    fn give_back(&mut self) {
        self.permit = None;
        if let Some(Lease { conn, pool, .. }) = self.lease.take() {
            pool.put(conn);
        }
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        // The server stops polling a body once its length is reached, so
        // "read to the end" is also a body whose remaining length is zero.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl Inner {
    /// `upstream`'s permits.
    fn semaphore(&self, upstream: &Upstream) -> Arc<Semaphore> {
        let mut all = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let found = all
            .iter()
            .find(|(scheme, authority, _)| {
                *scheme == upstream.scheme && *authority == upstream.authority
            })
            .map(|(_, _, semaphore)| Arc::clone(semaphore));
        found.unwrap_or_else(|| {
            let semaphore = Arc::new(Semaphore::new(self.max_in_flight));
            all.push((
                upstream.scheme.clone(),
                upstream.authority.clone(),
                Arc::clone(&semaphore),
            ));
            semaphore
        })
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleList>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently idled open connection to `upstream`.
    fn checkout(&self, upstream: &Upstream) -> Option<Conn> {
        let mut idle = self.lock_idle();
        let list = idle
            .iter_mut()
            .find(|list| list.is_for(&upstream.scheme, &upstream.authority))?;
        let now = Instant::now();
        while let Some(entry) = list.conns.pop() {
            if entry.usable(now) {
                return Some(entry.conn);
            }
            // Closed or expired: dropping it closes it.
        }
        None
    }

    /// Keeps `conn` for another request if it is still open.
    fn put(self: &Arc<Self>, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.lock_idle();
        let at = match idle
            .iter()
            .position(|list| list.is_for(&conn.scheme, &conn.authority))
        {
            Some(at) => at,
            None => {
                idle.push(IdleList {
                    scheme: conn.scheme.clone(),
                    authority: conn.authority.clone(),
                    conns: Vec::new(),
                });
                idle.len() - 1
            }
        };
        let conns = &mut idle[at].conns;
        if conns.len() >= POOL_MAX_IDLE_PER_HOST {
            // The longest idle one makes room.
            conns.remove(0);
        }
        conns.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes idle connections that expired or that their upstream closed.
    fn reap(&self) {
        let now = Instant::now();
        for list in self.lock_idle().iter_mut() {
            list.conns.retain(|e| e.usable(now));
        }
    }

    /// Started with the first connection, so that an idle gateway runs no
    /// timer and the request path never checks.
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

    /// [`Inner::connect`] on the heap: connecting is rare (the pool reuses
    /// connections) and its future is large, and a future awaited inline
    /// makes every `send` future, and the request future around it, that
    /// large, to be moved on every request.
    fn connect_boxed<'a>(
        self: &'a Arc<Self>,
        upstream: &'a Upstream,
    ) -> Pin<Box<dyn Future<Output = Result<Conn, SendError>> + Send + 'a>> {
        Box::pin(self.connect(upstream))
    }

    async fn connect(self: &Arc<Self>, upstream: &Upstream) -> Result<Conn, SendError> {
        self.start_reaper();
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
