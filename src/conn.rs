//! What a connection knows, shared by the listener that owns it and the
//! request path that serves it: who the peer is, the connection's sessions,
//! and its activity (requests in flight, when it last did something).
//!
//! The listener ([`crate::server`]) creates a [`ConnInfo`] per connection and
//! reads the activity for its timeouts; the request path marks requests in
//! flight with [`Activity::begin`]. Neither imports the other.
//!
//! An HTTP/2 stream runs as a task of its own, spawned by [`StreamExecutor`],
//! which knows the stream's reset signal ([`reset_stream_on`]): once that is
//! cancelled (a revocation, or `send_timeout`), the task is dropped, and with
//! it the stream (RST_STREAM), what it had queued, and its upstream body.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::registry::DigestMemo;
use crate::sessions::ConnSessions;

/// What a connection task knows about its connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
    /// The peer's address as an `x-forwarded-for` value, made once.
    pub client_ip: http::HeaderValue,
    pub sessions: ConnSessions,
    pub activity: Arc<Activity>,
    /// The digests of the token values this connection presented last.
    pub digests: DigestMemo,
}

impl ConnInfo {
    /// The record of a new connection from `peer`.
    pub fn new(peer: SocketAddr, scheme: &'static str, sessions: ConnSessions) -> ConnInfo {
        ConnInfo {
            peer,
            scheme,
            client_ip: http::HeaderValue::try_from(peer.ip().to_string())
                .unwrap_or_else(|_| http::HeaderValue::from_static("unknown")),
            sessions,
            activity: Activity::new(),
            digests: DigestMemo::default(),
        }
    }
}

/// When a connection last did something, for the header and idle timeouts.
pub struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    served: AtomicU64,
    http2: AtomicBool,
    /// Milliseconds after `base` when the last request finished.
    idle_since: AtomicU64,
    /// 1 + milliseconds after `base` of the first byte of a head not yet
    /// complete; 0 when none is arriving.
    partial_since: AtomicU64,
    /// A head with conflicting framing was read (SPEC §3 row 16).
    smuggled: AtomicBool,
    /// Close with a reset rather than a FIN: the connection was revoked.
    abortive: AtomicBool,
    /// A write or flush is waiting for the client to take bytes.
    write_blocked: AtomicBool,
    /// HTTP/1.1 is letting go of the socket without closing it (parking).
    keep_socket: AtomicBool,
    /// 1 + microseconds after `base` when the upstream call of the
    /// HTTP/1.1 request in flight began, or 0.
    upstream_since: AtomicU64,
    /// The watchdog found that upstream call past `request_timeout`.
    upstream_expired: AtomicBool,
    /// HTTP/2 response bodies in flight, each with [`SendClock`]'s state.
    sends: std::sync::Mutex<Vec<std::sync::Weak<SendState>>>,
}

/// What the watchdog reads of one HTTP/2 response body.
struct SendState {
    /// 1 + milliseconds after the connection's start when the body handed a
    /// frame that the server has not come back for, or 0.
    handed_at: AtomicU64,
    /// Resets the body's stream.
    reset: CancellationToken,
}

/// Whether an HTTP/2 response body is waiting for the client to take what
/// it was handed: 1 + milliseconds after the connection's start when it
/// handed a frame that the server has not come back for, or 0. (The server
/// does not ask a body for more while the stream has no window.)
pub struct SendClock {
    send: Arc<SendState>,
    activity: Arc<Activity>,
}

impl SendClock {
    /// A frame was handed over (`true`), or the body waits for its upstream
    /// or is done (`false`).
    pub fn handed(&self, frame: bool) {
        let at = if frame { self.activity.now_ms() + 1 } else { 0 };
        self.send.handed_at.store(at, Ordering::Release);
    }
}

/// Marks a request in flight until dropped.
pub struct ActivityGuard(Arc<Activity>);

impl ActivityGuard {
    /// The connection's activity record.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.0
    }
}

impl Activity {
    /// A connection that has served nothing yet.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            partial_since: AtomicU64::new(0),
            smuggled: AtomicBool::new(false),
            abortive: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            keep_socket: AtomicBool::new(false),
            upstream_since: AtomicU64::new(0),
            upstream_expired: AtomicBool::new(false),
            sends: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A clock for an HTTP/2 response body whose stream `reset` resets,
    /// watched by [`Activity::reset_stalled`].
    pub fn send_clock(self: &Arc<Self>, reset: CancellationToken) -> SendClock {
        let send = Arc::new(SendState {
            handed_at: AtomicU64::new(0),
            reset,
        });
        let mut sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        sends.retain(|clock| clock.strong_count() > 0);
        sends.push(Arc::downgrade(&send));
        SendClock {
            send,
            activity: Arc::clone(self),
        }
    }

    /// Resets every HTTP/2 stream whose body has waited longer than `limit`
    /// for the client to take a frame it was handed (`send_timeout`); the
    /// connection and its other streams go on. Returns how many were reset.
    pub fn reset_stalled(&self, limit: Duration) -> usize {
        let now = self.now_ms();
        let limit = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        let mut reset = 0;
        for send in sends.iter().filter_map(std::sync::Weak::upgrade) {
            let at = send.handed_at.load(Ordering::Acquire);
            if at != 0 && now.saturating_sub(at - 1) > limit && !send.reset.is_cancelled() {
                send.reset.cancel();
                reset += 1;
            }
        }
        reset
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request head arrived.
    pub fn begin(self: &Arc<Self>, http2: bool) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.partial_since.store(0, Ordering::Release);
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        ActivityGuard(Arc::clone(self))
    }

    /// Whether a head read on this connection had conflicting framing
    /// (`Content-Length` with `Transfer-Encoding`, or two `Content-Length`s),
    /// which hyper resolves silently before a service could see it.
    pub fn smuggled(&self) -> bool {
        self.smuggled.load(Ordering::Acquire)
    }

    /// The head scanner found conflicting framing.
    pub fn mark_smuggled(&self) {
        self.smuggled.store(true, Ordering::Release);
    }

    /// The connection is to be closed with a reset (it was revoked).
    pub fn mark_abortive(&self) {
        self.abortive.store(true, Ordering::Release);
    }

    /// Whether the connection is to be closed with a reset.
    pub fn is_abortive(&self) -> bool {
        self.abortive.load(Ordering::Acquire)
    }

    /// A write to the client is blocked (`true`) or made progress (`false`).
    pub fn set_write_blocked(&self, blocked: bool) {
        self.write_blocked.store(blocked, Ordering::Release);
    }

    /// Whether the last write to the client is waiting for it to take bytes.
    pub fn is_write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Acquire)
    }

    /// While set, closing HTTP/1.1's side of the connection leaves the
    /// socket open, to be parked and served again.
    pub fn set_keep_socket(&self, keep: bool) {
        self.keep_socket.store(keep, Ordering::Release);
    }

    /// Whether the socket is to stay open when HTTP/1.1 lets go of it.
    pub fn keeps_socket(&self) -> bool {
        self.keep_socket.load(Ordering::Acquire)
    }

    /// When this HTTP/1.1 keep-alive connection may be parked if nothing
    /// happens before: `after` its last request finished, provided it has
    /// served one and has nothing in flight, no head arriving and no write
    /// waiting (`None` otherwise).
    pub fn park_at(&self, after: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0
            || self.served.load(Ordering::Relaxed) == 0
            || self.partial_since.load(Ordering::Acquire) != 0
            || self.http2.load(Ordering::Relaxed)
            || self.is_write_blocked()
        {
            return None;
        }
        let idle_since = Duration::from_millis(self.idle_since.load(Ordering::Acquire));
        Some(self.base + idle_since + after)
    }

    /// Bytes arrived: with nothing in flight they start a head, which
    /// `header_timeout` then bounds.
    pub fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.partial_since.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.partial_since
                .store(self.now_ms() + 1, Ordering::Release);
        }
    }

    /// Runs the upstream `call` of the HTTP/1.1 request in flight, begun
    /// at `since`, until it is done (`Some`) or the connection's watchdog
    /// finds it has run for `request_timeout` (`None`; see
    /// [`Activity::expire_upstream`]). The watchdog runs in the connection's
    /// task, which polls hyper, and with it this future, right after: the
    /// request needs no timer of its own. (HTTP/2 streams run on tasks of
    /// their own and keep one.)
    pub async fn within_request_timeout<F: Future>(
        &self,
        since: Instant,
        call: F,
    ) -> Option<F::Output> {
        let micros = since.saturating_duration_since(self.base).as_micros();
        let stored = u64::try_from(micros).unwrap_or(u64::MAX - 1) + 1;
        self.upstream_expired.store(false, Ordering::Release);
        self.upstream_since.store(stored, Ordering::Release);
        let _done = UpstreamDone(self);
        let mut call = std::pin::pin!(call);
        std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(Some(output)),
            Poll::Pending if self.upstream_expired.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await
    }

    /// When the upstream call in flight reaches `request_timeout`.
    pub fn upstream_deadline(&self, request_timeout: Duration) -> Option<Instant> {
        match self.upstream_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(self.base + Duration::from_micros(since - 1) + request_timeout),
        }
    }

    /// Marks the upstream call in flight expired if it has reached
    /// `request_timeout` by `now`; true if it was.
    pub fn expire_upstream(&self, now: Instant, request_timeout: Duration) -> bool {
        let expired = self
            .upstream_deadline(request_timeout)
            .is_some_and(|deadline| deadline <= now);
        if expired {
            self.upstream_expired.store(true, Ordering::Release);
        }
        expired
    }

    /// When the connection must close unless something happens first.
    pub fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, plus: Duration| self.base + Duration::from_millis(ms) + plus;
        if self.served.load(Ordering::Relaxed) == 0 {
            return Some(at(0, header_timeout));
        }
        let partial = self.partial_since.load(Ordering::Acquire);
        if partial != 0 && !self.http2.load(Ordering::Relaxed) {
            return Some(at(partial - 1, header_timeout));
        }
        Some(at(self.idle_since.load(Ordering::Acquire), idle_timeout))
    }
}

/// Clears the upstream call's start when it ends, however it ends.
struct UpstreamDone<'a>(&'a Activity);

impl Drop for UpstreamDone<'_> {
    fn drop(&mut self) {
        self.0.upstream_since.store(0, Ordering::Release);
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

tokio::task_local! {
    /// The HTTP/2 stream whose task is being polled.
    static STREAM: Arc<StreamSlot>;
}

/// What a stream's task knows of the request it serves.
#[derive(Default)]
struct StreamSlot {
    reset: OnceLock<CancellationToken>,
}

/// Resets the HTTP/2 stream being served, if this is one, once `cancel` is
/// cancelled, even while hyper waits for window and does not poll its body.
/// On HTTP/1.1 it does nothing (the connection task watches its session).
pub fn reset_stream_on(cancel: &CancellationToken) {
    let _ = STREAM.try_with(|slot| slot.reset.set(cancel.clone()));
}

/// The executor hyper spawns each HTTP/2 stream's task with. Each task runs
/// with its own `StreamSlot`, and is dropped as soon as the slot's reset
/// token is cancelled: h2 then resets the stream (RST_STREAM CANCEL) and
/// drops what it had queued for it, and the response body (with its upstream
/// connection, session and activity guards) goes with the task.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        let slot = Arc::new(StreamSlot::default());
        let task = STREAM.scope(Arc::clone(&slot), stream);
        tokio::spawn(async move {
            tokio::pin!(task);
            let mut reset = None;
            std::future::poll_fn(|cx| {
                // The reset first: a cancelled stream's task is not polled
                // again, so it hands h2 nothing more.
                if let Some(reset) = reset.as_mut() {
                    if Future::poll(std::pin::Pin::as_mut(reset), cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                if task.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                // Set while the task was polled, once its request was permitted.
                if reset.is_none() {
                    if let Some(token) = slot.reset.get() {
                        let mut cancelled = Box::pin(token.clone().cancelled_owned());
                        if cancelled.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(());
                        }
                        reset = Some(cancelled);
                    }
                }
                Poll::Pending
            })
            .await;
        });
    }
}
