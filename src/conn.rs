//! What a connection knows, shared by the listener that owns it and the
//! request path that serves it: who the peer is, the connection's sessions,
//! and its activity (requests in flight, when it last did something).
//!
//! The listener ([`crate::server`]) creates a [`ConnInfo`] per connection and
//! reads the activity for its timeouts; the request path marks requests in
//! flight with [`Activity::begin`]. Neither imports the other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

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
    /// HTTP/2 response bodies in flight, each with [`SendClock`]'s value.
    sends: std::sync::Mutex<Vec<std::sync::Weak<AtomicU64>>>,
}

/// Whether an HTTP/2 response body is waiting for the client to take what
/// it was handed: 1 + milliseconds after the connection's start when it
/// handed a frame that the server has not come back for, or 0. (The server
/// does not ask a body for more while the stream has no window.)
pub struct SendClock {
    handed_at: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl SendClock {
    /// A frame was handed over (`true`), or the body waits for its upstream
    /// or is done (`false`).
    pub fn handed(&self, frame: bool) {
        let at = if frame { self.activity.now_ms() + 1 } else { 0 };
        self.handed_at.store(at, Ordering::Release);
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
            sends: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A clock for an HTTP/2 response body, watched by [`Activity::send_stalled`].
    pub fn send_clock(self: &Arc<Self>) -> SendClock {
        let handed_at = Arc::new(AtomicU64::new(0));
        let mut sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        sends.retain(|clock| clock.strong_count() > 0);
        sends.push(Arc::downgrade(&handed_at));
        SendClock {
            handed_at,
            activity: Arc::clone(self),
        }
    }

    /// Whether an HTTP/2 response body has waited longer than `limit` for
    /// the client to take a frame it was handed (`send_timeout`).
    pub fn send_stalled(&self, limit: Duration) -> bool {
        let now = self.now_ms();
        let limit = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let sends = self.sends.lock().unwrap_or_else(|p| p.into_inner());
        sends
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .any(|clock| {
                let at = clock.load(Ordering::Acquire);
                at != 0 && now.saturating_sub(at - 1) > limit
            })
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

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
