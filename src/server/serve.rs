//! One client connection, from its first bytes to its close.
//!
//! The first bytes tell HTTP/2's preface from an HTTP/1.1 request line
//! ([`sniff`]); hyper then serves the connection beside three signals, in
//! [`Watch`]: its session token (a revoked HTTP/1.1 session closes the
//! connection at once), the shutdown token (drain gracefully), and a
//! watchdog that enforces `header_timeout` (a head must arrive in time:
//! slowloris) and `idle_timeout` (a keep-alive connection with nothing in
//! flight), and resets HTTP/2 streams whose client took nothing for
//! `send_timeout`. Hyper's own header timer is not used because it also cuts
//! idle keep-alive connections short.
//!
//! An HTTP/1.1 connection on a bare TCP socket that has been idle for
//! [`PARK_AFTER`] is parked: hyper lets go of it (its read and write
//! buffers, its request-future box, its cached header map are freed) and
//! the task waits on the socket's readiness holding only the socket, its
//! watched state and the connection's record. The next bytes get a fresh
//! hyper connection, with whatever hyper had read and not used put in front.
//! A client sees nothing of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::io::{Abort, WatchedIo};
use crate::config::ServerSettings;
use crate::conn::{ConnInfo, StreamExecutor};
use crate::decision::MAX_HEAD_BYTES;
use crate::proxy;
use crate::state::Shared;

/// Most concurrent HTTP/2 streams per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before the server accepts them (rapid reset).
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// How long an HTTP/1.1 keep-alive connection on a bare socket waits idle
/// before it is parked. Short, so that few connections hold hyper's buffers
/// at once (what they free is then reused rather than left in half-empty
/// pages: a second here costs about 2.5x the memory per idle connection);
/// long enough that a connection busy with requests does not park between
/// two of them. A connection that may park wakes its watchdog once per this
/// interval.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// HTTP/2's connection preface, which an h2c or `h2` client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The hyper connection builders used for every client connection.
pub struct Http {
    http1: http1::Builder,
    http2: http2::Builder<StreamExecutor>,
}

impl Http {
    /// Builders with the gateway's settings.
    pub fn new() -> Http {
        let mut http1 = http1::Builder::new();
        http1
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true)
            .half_close(false);
        let mut http2 = http2::Builder::new(StreamExecutor);
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_header_list_size(2 * MAX_HEAD_BYTES as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Http { http1, http2 }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

/// Serves one client connection until it ends, is revoked, idles out, or
/// shutdown drains it.
pub async fn serve_connection<I>(
    io: I,
    info: Arc<ConnInfo>,
    http: &Http,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Abort + Unpin + Send + 'static,
{
    let server = &shared.config.server;
    // Boxed: the task keeps a pointer, not two copies, of the socket's state.
    let mut io = Box::new(WatchedIo::new(
        io,
        Arc::clone(&info.activity),
        Arc::clone(&info.sessions.socket),
        server.send_timeout,
    ));
    let request_timeout = shared.config.upstream.request_timeout;
    let mut watch = Watch::new(&info, server, request_timeout, shutdown);
    let Some(http2) = first_bytes(&mut io, &mut watch).await else {
        return;
    };
    let service = {
        let (shared, info) = (Arc::clone(&shared), Arc::clone(&info));
        service_fn(move |request| proxy::handle(Arc::clone(&shared), Arc::clone(&info), request))
    };
    if http2 {
        // Boxed, like HTTP/1.1's, to keep every connection's task small.
        let mut connection = Box::pin(http.http2.serve_connection(TokioIo::new(io), service));
        let shut = |c: Pin<&mut http2::Connection<_, _, _>>| c.graceful_shutdown();
        watch.drive(connection.as_mut(), false, shut).await;
    } else {
        let parked = shared.metrics.connections_parked.clone();
        serve_http1(io, service, http, &mut watch, &parked).await;
    }
}

/// Reads the first bytes and puts them back: `Some(true)` when they are
/// HTTP/2's preface, `None` when the connection ended or must close first.
async fn first_bytes<I>(io: &mut WatchedIo<I>, watch: &mut Watch<'_>) -> Option<bool>
where
    I: AsyncRead + AsyncWrite + Abort + Unpin,
{
    let sniffed = {
        let sniffing = sniff(&mut *io);
        tokio::pin!(sniffing);
        watch.guard(sniffing).await?
    };
    match sniffed {
        Ok((http2, prefix)) => {
            io.unread(prefix);
            Some(http2)
        }
        Err(err) => {
            tracing::debug!(peer = %watch.info.peer, error = %err, "connection ended before a request");
            None
        }
    }
}

/// Reads the first bytes: `true` when they are HTTP/2's preface, with the
/// bytes read, to be read again by the protocol's parser. Stops reading at
/// the first byte that differs from the preface, as hyper-util's does.
async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        let before = filled;
        filled += n;
        if n == 0 || buf[before..filled] != H2_PREFACE[before..filled] {
            return Ok((false, Bytes::copy_from_slice(&buf[..filled])));
        }
    }
    Ok((true, Bytes::copy_from_slice(&buf)))
}

/// Serves HTTP/1.1, parking the connection whenever it has idled for
/// [`PARK_AFTER`] on a bare socket.
async fn serve_http1<I, S, B>(
    mut io: Box<WatchedIo<I>>,
    mut service: S,
    http: &Http,
    watch: &mut Watch<'_>,
    parked: &prometheus::IntGauge,
) where
    I: AsyncRead + AsyncWrite + Abort + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parkable = io.get_ref().bare().is_some();
    loop {
        // Boxed, so that a parked connection's task does not keep room for
        // it; the box is freed at the end of this block, before the park.
        let parts = {
            let mut connection = Box::new(http.http1.serve_connection(TokioIo::new(io), service));
            let shut = |c: Pin<&mut http1::Connection<_, S>>| c.graceful_shutdown();
            if watch
                .drive(Pin::new(&mut *connection), parkable, shut)
                .await
                == Ran::Ended
            {
                return;
            }
            // Idle: hyper closes an idle connection at once when asked to
            // shut down, and leaves the socket open while `keep_socket` is set.
            watch.info.activity.set_keep_socket(true);
            Pin::new(&mut *connection).graceful_shutdown();
            let polled = poll_once(Pin::new(&mut *connection)).await;
            watch.info.activity.set_keep_socket(false);
            match polled {
                Poll::Ready(Ok(())) if !watch.info.activity.is_write_blocked() => {}
                // A write still waiting would be lost: end here, as on an error.
                Poll::Ready(_) => return,
                Poll::Pending => {
                    // Hyper was not idle after all (a request body still
                    // being read, say): it closes once that is done, as
                    // when draining.
                    watch.drive(Pin::new(&mut *connection), false, shut).await;
                    return;
                }
            }
            connection.into_parts()
        };
        io = parts.io.into_inner();
        service = parts.service;
        io.unread(parts.read_buf);
        if !io.has_unread() {
            let Some(socket) = io.get_ref().bare() else {
                return;
            };
            tracing::debug!(peer = %watch.info.peer, "connection parked");
            watch.info.digests.forget();
            let counted = Parked::new(parked);
            // `poll_read_ready` keeps the waker in the socket's own slot: no
            // waiter node in the task, as `readable()` would keep.
            let readable = std::future::poll_fn(|cx| socket.poll_read_ready(cx));
            tokio::pin!(readable);
            let woken = watch.guard(readable).await;
            drop(counted);
            if !matches!(woken, Some(Ok(()))) {
                return;
            }
        }
    }
}

/// Counts a parked connection in `stackgate_connections_parked` while it
/// lives, however the wait ends (the task may be dropped in it).
struct Parked<'a>(&'a prometheus::IntGauge);

impl<'a> Parked<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Parked(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Waits for `token` to be cancelled, as `token.cancelled()` does, more
/// cheaply when polled often. The first poll leaves the task's waker with
/// the token; every later poll only reads whether it was cancelled (an
/// atomic load), instead of polling its `Notify` again, which takes a lock.
/// A connection's task is woken several times per request, and polls its
/// revocation and shutdown tokens each time.
async fn cancelled(token: &CancellationToken) {
    let mut wait = std::pin::pin!(token.cancelled());
    let mut registered = false;
    std::future::poll_fn(|cx| {
        if token.is_cancelled() {
            return Poll::Ready(());
        }
        if !registered {
            registered = true;
            return wait.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
}

/// Polls `future` once, with the task's waker.
async fn poll_once<F: Future + Unpin>(mut future: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
}

/// How a hyper connection's run ended.
#[derive(Debug, PartialEq, Eq)]
enum Ran {
    /// The connection is done: closed, failed, revoked, timed out.
    Ended,
    /// The connection has idled for [`PARK_AFTER`] and may be parked.
    Idle,
}

/// What a connection task watches besides its I/O: revocation, shutdown,
/// and the watchdog's timer. Small, as a parked connection keeps it.
struct Watch<'a> {
    info: &'a ConnInfo,
    /// `header_timeout`, `idle_timeout`, `send_timeout`.
    server: &'a ServerSettings,
    /// `upstream.request_timeout`, for HTTP/1.1's upstream calls.
    request_timeout: Duration,
    revoked: CancellationToken,
    shutdown: CancellationToken,
    draining: bool,
    timer: Pin<Box<Sleep>>,
}

impl<'a> Watch<'a> {
    fn new(
        info: &'a ConnInfo,
        server: &'a ServerSettings,
        request_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let mut watch = Watch {
            info,
            server,
            request_timeout,
            revoked: info.sessions.cancel.clone(),
            shutdown,
            draining: false,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
        };
        watch.rearm(Instant::now(), false);
        watch
    }

    /// Arms the timer for the next check. The watchdog needs no wake-up from
    /// the request path: every deadline is an event's time plus a timeout,
    /// and events happen after the watchdog last looked, so waking at the
    /// earliest known deadline, and at least every `min(timeouts)`, is never
    /// late. Requests only store timestamps; the timer is re-armed when it
    /// fires, at most once per that minimum. A connection that may park
    /// looks at least every [`PARK_AFTER`], so it parks between one and two
    /// of them after its last request.
    fn rearm(&mut self, now: Instant, parking: bool) {
        let t = self.server;
        let mut every = t.header_timeout.min(t.idle_timeout).min(t.send_timeout);
        every = every.min(self.request_timeout);
        if parking {
            every = every.min(PARK_AFTER);
        }
        let mut next = now + every;
        let activity = &self.info.activity;
        if let Some(deadline) = activity.deadline(t.header_timeout, t.idle_timeout) {
            next = next.min(deadline);
        }
        if let Some(deadline) = activity.upstream_deadline(self.request_timeout) {
            next = next.min(deadline);
        }
        if parking {
            if let Some(park) = self.info.activity.park_at(PARK_AFTER) {
                next = next.min(park);
            }
        }
        self.timer.as_mut().reset(next);
    }

    /// Whether the header or idle timeout has passed.
    fn expired(&self, now: Instant) -> bool {
        let t = self.server;
        let expired = (self.info.activity)
            .deadline(t.header_timeout, t.idle_timeout)
            .is_some_and(|d| d <= now);
        if expired {
            tracing::debug!(peer = %self.info.peer, "connection closed: header or idle timeout");
        }
        expired
    }

    fn revoke(&self) {
        tracing::debug!(peer = %self.info.peer, "connection closed: its session was revoked");
        self.info.activity.mark_abortive();
    }

    /// Runs a hyper connection until it ends, or (with `parking`) until it
    /// has idled for [`PARK_AFTER`]. `shut` starts its graceful shutdown.
    async fn drive<C>(
        &mut self,
        mut connection: Pin<&mut C>,
        parking: bool,
        shut: impl Fn(Pin<&mut C>),
    ) -> Ran
    where
        C: Future<Output = hyper::Result<()>>,
    {
        if parking {
            self.rearm(Instant::now(), true);
        }
        loop {
            // Biased, revocation first: once a session is cancelled, hyper
            // is not polled again, so not one more byte goes out on it.
            tokio::select! {
                biased;
                () = cancelled(&self.revoked) => {
                    self.revoke();
                    return Ran::Ended;
                }
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(peer = %self.info.peer, error = %err, "connection ended with an error");
                    }
                    return Ran::Ended;
                }
                () = cancelled(&self.shutdown), if !self.draining => {
                    shut(connection.as_mut());
                    self.draining = true;
                }
                () = self.timer.as_mut() => {
                    let now = Instant::now();
                    if self.expired(now) {
                        return Ran::Ended;
                    }
                    // An HTTP/1.1 upstream call past `request_timeout`
                    // answers 504 when hyper polls it, next in this loop.
                    if self.info.activity.expire_upstream(now, self.request_timeout) {
                        tracing::debug!(peer = %self.info.peer, "upstream call past request_timeout");
                    }
                    // HTTP/2 streams whose client took nothing for
                    // `send_timeout` are reset; the connection and its other
                    // streams go on.
                    let reset = self.info.activity.reset_stalled(self.server.send_timeout);
                    if reset > 0 {
                        tracing::debug!(peer = %self.info.peer, streams = reset, "HTTP/2 streams reset: the client took nothing for send_timeout");
                    }
                    let parking = parking && !self.draining;
                    let idle = parking && self.info.activity.park_at(PARK_AFTER).is_some_and(|at| at <= now);
                    self.rearm(now, parking && !idle);
                    if idle {
                        return Ran::Idle;
                    }
                }
            }
        }
    }

    /// Waits for `future` while no hyper connection is running (the first
    /// bytes, or a parked connection's next ones); `None` when the
    /// connection is to close instead: revoked, shut down, timed out.
    async fn guard<F: Future>(&mut self, mut future: Pin<&mut F>) -> Option<F::Output> {
        loop {
            tokio::select! {
                biased;
                () = cancelled(&self.revoked) => {
                    self.revoke();
                    return None;
                }
                () = cancelled(&self.shutdown) => return None,
                output = future.as_mut() => return Some(output),
                () = self.timer.as_mut() => {
                    let now = Instant::now();
                    if self.expired(now) {
                        return None;
                    }
                    self.rearm(now, false);
                }
            }
        }
    }
}
