//! Live sessions, and ending them when a token is revoked (SPEC §4).
//!
//! A session is a client connection on which a token was used, together with
//! that token's requests in flight on it. Every session and every request in
//! flight has a [`CancellationToken`] and is removed from the map by a `Drop`
//! guard. Revocation cancels the matching tokens:
//!
//! - on HTTP/1.1 a session's token *is* its connection's token, so cancelling
//!   it closes the connection (idle keep-alive ones included) and cuts off any
//!   response mid-body; revocation resets the connection's socket itself
//!   first ([`SocketHandle`]), so the client need not wait for the task;
//! - on HTTP/2 a session has its own token, and each stream a child of it, so
//!   only that token's streams are reset and the connection lives on.
//!
//! Revocation latency is measured from when the registry learned of the change
//! to when the last cancelled session or stream was actually dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::decision::{Permit, SessionKind};
use crate::metrics::Metrics;
use crate::registry::Token;
pub use socket::SocketHandle;

/// Distinct (environment, branch) uses remembered per HTTP/1.1 session; a
/// client cycling through more (a `$all` token) is treated as using all.
pub const MAX_TRACKED_USES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    stack: usize,
    uid: Arc<str>,
}

/// What a request read: revocation by narrowing compares this with the new scope.
#[derive(Debug, Clone)]
struct Usage {
    /// The `environment` values it gave; empty means the token's own.
    environments: Vec<String>,
    branch: String,
    /// The token as it was when the request was allowed.
    token: Arc<Token>,
}

impl Usage {
    fn of(permit: &Permit<'_, '_>) -> Usage {
        Usage {
            environments: permit.environments.iter().map(|e| e.to_string()).collect(),
            branch: permit.branch.to_string(),
            token: Arc::clone(&permit.token),
        }
    }

    /// [`Usage::same_reach`] against a permit, without building its usage.
    fn same_reach_as(&self, permit: &Permit<'_, '_>) -> bool {
        self.branch == permit.branch
            && self.environments.iter().eq(permit.environments.iter())
            && (Arc::ptr_eq(&self.token, &permit.token)
                || self.token.scope.environments == permit.token.scope.environments)
    }

    fn same_reach(&self, other: &Usage) -> bool {
        self.environments == other.environments
            && self.branch == other.branch
            && self.token.scope.environments == other.token.scope.environments
    }

    /// Whether the token's scope now (`None`: deleted) still covers this use.
    fn covered_by(&self, now: Option<&Token>) -> bool {
        let Some(now) = now else {
            return false;
        };
        let environments = if self.environments.is_empty() {
            self.token
                .scope
                .environments
                .iter()
                .all(|old| now.scope.environments.contains(old))
        } else {
            self.environments
                .iter()
                .all(|env| now.scope.allows_environment(env))
        };
        environments && now.scope.allows_branch(&self.branch)
    }
}

struct InFlight {
    usage: Usage,
    cancel: CancellationToken,
    tracker: Option<Arc<Tracker>>,
}

struct Session {
    kind: SessionKind,
    /// On HTTP/1.1 the connection's own token.
    cancel: CancellationToken,
    /// On HTTP/1.1 the connection's socket, which revocation resets itself.
    socket: Option<Arc<SocketHandle>>,
    closes_connection: bool,
    /// Distinct uses seen on an HTTP/1.1 session (a keep-alive connection
    /// must close if any of them is no longer covered).
    used: Vec<Usage>,
    /// More than [`MAX_TRACKED_USES`] distinct uses: any narrowing ends it.
    used_overflow: bool,
    requests: FastMap<u64, InFlight>,
    tracker: Option<Arc<Tracker>>,
    /// An HTTP/2 session whose token was revoked: removed when its last
    /// stream is, and never reused.
    ended: bool,
}

/// Counts what one revocation cancelled down to zero, then records the latency
/// (only for revocations that cancelled something).
struct Tracker {
    remaining: AtomicUsize,
    cancelled_any: std::sync::atomic::AtomicBool,
    learned_at: Instant,
    metrics: Metrics,
    done: watch::Sender<bool>,
}

impl Tracker {
    fn finish_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if self.cancelled_any.load(Ordering::Acquire) {
                let elapsed = self.learned_at.elapsed();
                self.metrics
                    .revocation_seconds
                    .observe(elapsed.as_secs_f64());
            }
            self.done.send_replace(true);
        }
    }
}

/// Waits for the sessions one revocation cancelled to be gone.
pub struct Revocation {
    /// How many sessions (HTTP/1.1 connections) and streams were cancelled.
    pub cancelled: usize,
    done: watch::Receiver<bool>,
}

impl Revocation {
    /// Resolves once every cancelled session and stream has closed.
    pub async fn closed(mut self) {
        let _ = self.done.wait_for(|done| *done).await;
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Every live session, by token.
pub struct Sessions {
    by_token: DashMap<TokenKey, FastMap<u64, Session>, foldhash::fast::RandomState>,
    next_id: AtomicU64,
    metrics: Metrics,
    stack_names: Vec<Arc<str>>,
}

/// The sessions opened on one client connection. Dropping it (when the
/// connection ends) removes them all.
pub struct ConnSessions {
    /// Cancelling this closes the connection.
    pub cancel: CancellationToken,
    /// The connection's socket: revoking an HTTP/1.1 session resets it.
    pub socket: Arc<SocketHandle>,
    sessions: Arc<Sessions>,
    open: Mutex<Open>,
}

/// The sessions of one connection, by token and kind: nearly always one (a
/// site's visitors use its one token), kept in a short list that costs an
/// idle connection a few dozen bytes; a connection that goes past
/// [`OPEN_LIST_MAX`] tokens (a backend cycling through many) moves to a map,
/// so that no request scans a long list.
enum Open {
    Few(Vec<(OpenKey, OpenSession)>),
    Many(FastMap<OpenKey, OpenSession>),
}

type OpenKey = (TokenKey, SessionKind);

/// Most sessions a connection keeps in a list before it moves to a map.
const OPEN_LIST_MAX: usize = 4;

impl Default for Open {
    fn default() -> Self {
        Open::Few(Vec::new())
    }
}

impl Open {
    fn get(&self, key: &OpenKey) -> Option<&OpenSession> {
        match self {
            Open::Few(list) => list.iter().find(|(k, _)| k == key).map(|(_, s)| s),
            Open::Many(map) => map.get(key),
        }
    }

    fn get_mut(&mut self, key: &OpenKey) -> Option<&mut OpenSession> {
        match self {
            Open::Few(list) => list.iter_mut().find(|(k, _)| k == key).map(|(_, s)| s),
            Open::Many(map) => map.get_mut(key),
        }
    }

    fn insert(&mut self, key: OpenKey, session: OpenSession) {
        if let Some(slot) = self.get_mut(&key) {
            *slot = session;
            return;
        }
        match self {
            Open::Few(list) if list.len() < OPEN_LIST_MAX => {
                list.reserve_exact(1);
                list.push((key, session));
            }
            Open::Few(list) => {
                let mut map: FastMap<OpenKey, OpenSession> = list.drain(..).collect();
                map.insert(key, session);
                *self = Open::Many(map);
            }
            Open::Many(map) => {
                map.insert(key, session);
            }
        }
    }

    fn into_sessions(self) -> Vec<(OpenKey, OpenSession)> {
        match self {
            Open::Few(list) => list,
            Open::Many(map) => map.into_iter().collect(),
        }
    }
}

struct OpenSession {
    id: u64,
    /// HTTP/1.1: a copy of the uses its session records. A request that
    /// repeats one of them, nearly every request on a keep-alive
    /// connection, needs no more bookkeeping: revoking any recorded use
    /// closes the connection, requests in flight with it.
    uses: Vec<Usage>,
    overflow: bool,
}

/// One request in flight. On HTTP/2 it is a stream with its own entry and
/// cancellation, removed when the guard is dropped (its response body
/// finished or abandoned). On HTTP/1.1 there is nothing per request: a
/// revocation closes the whole connection, requests in flight with it.
pub struct RequestGuard {
    stream: Option<Stream>,
}

struct Stream {
    sessions: Arc<Sessions>,
    key: TokenKey,
    session: u64,
    request: u64,
    /// Cancelled when the stream must be reset.
    cancel: CancellationToken,
}

impl RequestGuard {
    /// Cancelled when this HTTP/2 stream must be reset; `None` on HTTP/1.1,
    /// where the connection task closes the connection instead.
    pub fn cancel(&self) -> Option<&CancellationToken> {
        self.stream.as_ref().map(|stream| &stream.cancel)
    }
}

impl Sessions {
    /// An empty map; `stack_names` label the metrics by stack index.
    pub fn new(metrics: Metrics, stack_names: Vec<Arc<str>>) -> Arc<Sessions> {
        Arc::new(Sessions {
            by_token: DashMap::default(),
            next_id: AtomicU64::new(1),
            metrics,
            stack_names,
        })
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn stack_name(&self, stack: usize) -> &str {
        self.stack_names.get(stack).map_or("", |s| s)
    }

    /// The session registry for a new client connection.
    pub fn connection(self: &Arc<Self>) -> ConnSessions {
        ConnSessions {
            cancel: CancellationToken::new(),
            socket: Arc::default(),
            sessions: Arc::clone(self),
            open: Mutex::new(Open::default()),
        }
    }

    /// Live sessions of a token.
    pub fn live(&self, stack: usize, uid: &str) -> usize {
        let key = TokenKey {
            stack,
            uid: Arc::from(uid),
        };
        self.by_token.get(&key).map_or(0, |s| s.len())
    }

    /// Registers a permitted request on `conn`. `http2` selects stream-level
    /// cancellation instead of closing the connection.
    pub fn begin(&self, conn: &ConnSessions, permit: &Permit<'_, '_>, http2: bool) -> RequestGuard {
        let key = TokenKey {
            stack: permit.stack.index,
            uid: Arc::clone(&permit.token.uid),
        };
        let open_key = (key, permit.session);
        let mut open = conn.open.lock().unwrap_or_else(|p| p.into_inner());
        if !http2 {
            if let Some(local) = open.get(&open_key) {
                if local.overflow || local.uses.iter().any(|u| u.same_reach_as(permit)) {
                    return RequestGuard { stream: None };
                }
            }
        }
        let key = open_key.0.clone();
        let usage = Usage::of(permit);
        let mut entry = self.by_token.entry(key.clone()).or_default();
        let existing = open
            .get(&open_key)
            .map(|local| local.id)
            .filter(|id| entry.get(id).is_some_and(|s| !s.ended));
        let session_id = match existing {
            Some(id) => id,
            None => {
                let id = self.id();
                let cancel = if http2 {
                    conn.cancel.child_token()
                } else {
                    conn.cancel.clone()
                };
                entry.insert(
                    id,
                    Session {
                        kind: permit.session,
                        cancel,
                        socket: (!http2).then(|| Arc::clone(&conn.socket)),
                        closes_connection: !http2,
                        // Room for the one use nearly every HTTP/1.1
                        // session has, not the four a first push reserves.
                        used: Vec::with_capacity(usize::from(!http2)),
                        used_overflow: false,
                        requests: FastMap::default(),
                        tracker: None,
                        ended: false,
                    },
                );
                let local = OpenSession {
                    id,
                    uses: Vec::with_capacity(usize::from(!http2)),
                    overflow: false,
                };
                open.insert(open_key.clone(), local);
                id
            }
        };
        // Inserted above under the same lock if it was not there.
        let Some(session) = entry.get_mut(&session_id) else {
            return RequestGuard { stream: None };
        };
        if session.closes_connection {
            if !session.used.iter().any(|u| u.same_reach(&usage)) {
                if session.used.len() < MAX_TRACKED_USES {
                    session.used.push(usage.clone());
                } else {
                    session.used_overflow = true;
                }
            }
            let overflow = session.used_overflow;
            drop(entry);
            if let Some(local) = open.get_mut(&open_key) {
                if overflow {
                    local.overflow = true;
                    local.uses = Vec::new();
                } else if !local.uses.iter().any(|u| u.same_reach(&usage)) {
                    local.uses.push(usage);
                }
            }
            return RequestGuard { stream: None };
        }
        let request = self.id();
        let cancel = session.cancel.child_token();
        session.requests.insert(
            request,
            InFlight {
                usage,
                cancel: cancel.clone(),
                tracker: None,
            },
        );
        drop(entry);
        drop(open);
        RequestGuard {
            stream: Some(Stream {
                sessions: Arc::clone(&conn.sessions),
                key,
                session: session_id,
                request,
                cancel,
            }),
        }
    }

    /// Drops a token's entry once it holds no session.
    fn remove_if_empty(&self, key: &TokenKey) {
        self.by_token
            .remove_if(key, |_, sessions| sessions.is_empty());
    }

    /// Sets `stackgate_active_sessions` from the map, dropping the series of
    /// tokens with no session. Called at scrape time, so that opening and
    /// closing sessions (and revoking thousands at once) touch no metric.
    pub fn export(&self) {
        let gauge = &self.metrics.active_sessions;
        gauge.reset();
        for entry in self.by_token.iter() {
            if !entry.is_empty() {
                let key = entry.key();
                gauge
                    .with_label_values(&[self.stack_name(key.stack), &key.uid])
                    .set(entry.len() as i64);
            }
        }
    }

    fn end_request(&self, key: &TokenKey, session: u64, request: u64) {
        let mut tracker = None;
        let mut empty = false;
        if let Some(mut entry) = self.by_token.get_mut(key) {
            if let Some(s) = entry.get_mut(&session) {
                tracker = s.requests.remove(&request).and_then(|r| r.tracker);
                if s.ended && s.requests.is_empty() {
                    entry.remove(&session);
                    empty = entry.is_empty();
                }
            }
        }
        if empty {
            self.remove_if_empty(key);
        }
        if let Some(tracker) = tracker {
            tracker.finish_one();
        }
    }

    fn close_session(&self, key: &TokenKey, session: u64) {
        let mut empty = false;
        let mut trackers = Vec::new();
        if let Some(mut entry) = self.by_token.get_mut(key) {
            if let Some(closed) = entry.remove(&session) {
                trackers.extend(closed.tracker);
                trackers.extend(closed.requests.into_values().filter_map(|r| r.tracker));
                empty = entry.is_empty();
            }
        }
        if empty {
            self.remove_if_empty(key);
        }
        for tracker in trackers {
            tracker.finish_one();
        }
    }
}

impl Drop for ConnSessions {
    fn drop(&mut self) {
        let open = std::mem::take(self.open.get_mut().unwrap_or_else(|p| p.into_inner()));
        for ((key, _kind), local) in open.into_sessions() {
            self.sessions.close_session(&key, local.id);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.sessions
            .end_request(&self.key, self.session, self.request);
    }
}

mod revoke;
mod socket;
#[cfg(test)]
mod tests;
