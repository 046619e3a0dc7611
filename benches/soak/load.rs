//! The clients, the origin they reach through the gateway, and the judge of
//! every answer.
//!
//! - HTTP/1.1 keep-alive clients each hold one token's sessions: a connection
//!   is opened for one token, sends a few hundred requests drawn from a small
//!   menu of variations (route, credentials, environment, branch), then makes
//!   way for another. One connection carries one token so that a connection
//!   cut is attributable: it is legitimate only if a change ended a use of
//!   that token on it ([`crate::model::Inner::ends`]).
//! - "Strangers" send only what no version allows (unknown tokens, no token,
//!   an unknown stack): their connections must never be cut.
//! - h2c clients keep several streams in flight on one connection, each
//!   stream for any token: a stream reset is legitimate only if a change
//!   ended that stream's own use, and the connection must never be lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::model::{
    Cred, Expect, History, Inner, Kind, Req, Route, BRANCH_HEADERS, ENVS, ENV_PARAMS,
};
use crate::API_KEY;

/// Requests on one HTTP/1.1 connection before it makes way for another token.
const REQUESTS_PER_CONNECTION: usize = 200;
/// Variations of a request one HTTP/1.1 connection draws from (few, so that
/// its distinct uses stay far below the gateway's 32 tracked per session).
const MENU: usize = 6;
/// Streams in flight on each h2c connection.
const H2_STREAMS: usize = 8;
/// A request with no answer after this long counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the pacer hands out permits.
const PACE_TICK: Duration = Duration::from_millis(10);
/// Pacing after a failed connect (already counted as an error).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How many mismatches are described in full.
const DETAILS: usize = 25;

/// The reasons counted one by one, in report order.
pub const REASONS: [&str; 8] = [
    "token_revoked",
    "invalid_token",
    "invalid_preview_token",
    "token_mismatch",
    "preview_token_on_delivery",
    "environment_out_of_scope",
    "branch_out_of_scope",
    "unknown_stack",
];

/// Counters of every answer, by outcome.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub allowed: AtomicU64,
    pub rejected: [AtomicU64; REASONS.len()],
    pub h1_requests: AtomicU64,
    pub h2_requests: AtomicU64,
    /// HTTP/1.1 requests failed because a change ended a use on their connection.
    pub cut_h1: AtomicU64,
    /// h2 streams reset because a change ended their use.
    pub cut_h2: AtomicU64,
    /// Transport errors no change explains.
    pub transport_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub h2_lost: AtomicU64,
    pub five_xx: AtomicU64,
    pub wrongly_allowed: AtomicU64,
    pub wrongly_rejected: AtomicU64,
    pub other_mismatch: AtomicU64,
    /// An HTTP/1.1 connection answered after a change that had to close it.
    pub missed_cuts: AtomicU64,
    pub h1_connections: AtomicU64,
    pub h2_connections: AtomicU64,
    pub details: Mutex<Vec<String>>,
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// Every count that must be zero.
    pub fn failures(&self) -> u64 {
        [
            &self.transport_errors,
            &self.timeouts,
            &self.h2_lost,
            &self.five_xx,
            &self.wrongly_allowed,
            &self.wrongly_rejected,
            &self.other_mismatch,
            &self.missed_cuts,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    fn detail(&self, text: String) {
        let mut details = self.details.lock().unwrap();
        if details.len() < DETAILS {
            eprintln!("MISMATCH {text}");
            details.push(text);
        }
    }
}

/// What the clients share.
pub struct Ctx {
    pub gateway: SocketAddr,
    pub history: Arc<History>,
    pub stats: Stats,
    pub stop: CancellationToken,
    pub seed: u64,
    /// One permit per request, when the load is paced ([`pace`]).
    pub permits: Option<Arc<Semaphore>>,
    next_id: AtomicU64,
}

impl Ctx {
    pub fn new(gateway: SocketAddr, history: Arc<History>, seed: u64, paced: bool) -> Ctx {
        Ctx {
            gateway,
            history,
            stats: Stats::default(),
            stop: CancellationToken::new(),
            seed,
            permits: paced.then(|| Arc::new(Semaphore::new(0))),
            next_id: AtomicU64::new(1),
        }
    }

    /// Waits for the pacer's permission to send one request; false once stopped.
    async fn may_send(&self) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        match &self.permits {
            None => true,
            Some(permits) => match permits.acquire().await {
                Ok(permit) => {
                    permit.forget();
                    !self.stop.is_cancelled()
                }
                Err(_) => false,
            },
        }
    }
}

/// Hands out `rate` permits a second (at most a tenth of a second's worth
/// banked), until stopped; then closes the semaphore so that waiters return.
pub async fn pace(ctx: Arc<Ctx>, rate: u64) {
    let Some(permits) = ctx.permits.clone() else {
        return;
    };
    let bank = (rate / 10).max(1) as usize;
    let mut tick = tokio::time::interval(PACE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    let mut credit = 0.0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.stop.cancelled() => break,
        }
        let now = tokio::time::Instant::now();
        credit += rate as f64 * (now - last).as_secs_f64();
        last = now;
        let whole = credit.floor();
        credit -= whole;
        let room = bank.saturating_sub(permits.available_permits());
        permits.add_permits((whole as usize).min(room));
    }
    permits.close();
}

/// An answer, read whole.
struct Answer {
    status: u16,
    reason: String,
    from_origin: bool,
    body: Bytes,
}

async fn read_answer(response: Response<hyper::body::Incoming>) -> Result<Answer, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    Ok(Answer {
        status: parts.status.as_u16(),
        reason: header("x-stackgate-reason"),
        from_origin: header("x-origin") == "soak",
        body,
    })
}

/// The HTTP request for `req`, and the path and query the origin must echo.
fn build(req: &Req, rid: u64, h2: bool) -> (Request<Full<Bytes>>, String) {
    let host = match req.route {
        Route::Delivery => "cdn.soak",
        Route::Preview => "preview.soak",
        Route::Graphql => "graphql.soak",
    };
    let key = if req.stack_ok {
        API_KEY
    } else {
        "blt_soak_no_such_stack"
    };
    let mut path = match req.route {
        Route::Delivery => format!("/v3/content_types/blog/entries?r={rid}"),
        Route::Preview => format!("/v3/content_types/blog/entries?r={rid}&live_preview=soak"),
        Route::Graphql => format!("/stacks/{key}?r={rid}"),
    };
    if let Some(env) = req.env {
        path.push_str("&environment=");
        path.push_str(env);
    }
    let mut builder = if h2 {
        Request::get(format!("http://{host}{path}"))
    } else {
        Request::get(path.as_str()).header("host", host)
    };
    if req.route != Route::Graphql {
        builder = builder.header("api_key", key);
    }
    if let Some(cred) = req.access {
        builder = builder.header("access_token", cred.header_value());
    }
    if let Some(cred) = req.preview {
        builder = builder.header("preview_token", cred.header_value());
    }
    if let Some(branch) = req.branch {
        builder = builder.header("branch", branch);
    }
    (builder.body(Full::new(Bytes::new())).unwrap(), path)
}

/// A token to hold a connection for: mostly listed ones (admin-revoked
/// included), some removed, a few about to be added.
fn pick_identity(history: &History, rng: &mut SmallRng) -> u32 {
    let inner = history.read();
    let latest = inner.versions.last().unwrap();
    let roll = rng.random_range(0..100);
    if roll < 75 && !latest.tokens.is_empty() {
        let i = rng.random_range(0..latest.tokens.len());
        return *latest.tokens.keys().nth(i).unwrap();
    }
    if roll < 90 {
        let removed = inner.removed();
        if let Some(n) = removed.choose(rng) {
            return *n;
        }
    }
    history.next_fresh.load(Ordering::Relaxed) + rng.random_range(0..2)
}

/// One request for token `n`: right or wrong credentials, in or out of scope.
fn variation(history: &History, rng: &mut SmallRng, n: u32, other: u32) -> Req {
    let current = history.latest().tokens.get(&n).cloned();
    let route = match rng.random_range(0..20) {
        0..=9 => Route::Delivery,
        10..=16 => Route::Preview,
        _ => Route::Graphql,
    };
    let env = match rng.random_range(0..10) {
        0..=5 => None,
        6..=7 => current.as_ref().map(|t| {
            let (name, uid) = ENVS[t.env];
            if rng.random_bool(0.5) {
                name
            } else {
                uid
            }
        }),
        _ => ENV_PARAMS.choose(rng).copied(),
    };
    let own: Vec<&'static str> = current.as_ref().map_or(Vec::new(), |t| {
        t.branches
            .iter()
            .chain(t.aliases.iter())
            .flatten()
            .copied()
            .filter(|b| *b != "$all")
            .collect()
    });
    let branch = match rng.random_range(0..10) {
        0..=4 => None,
        5..=7 => own.choose(rng).copied(),
        _ => BRANCH_HEADERS.choose(rng).copied(),
    };
    let delivery = Cred::Token(n, Kind::Delivery);
    let preview = Cred::Token(n, Kind::Preview);
    let (access, preview) = match route {
        Route::Delivery | Route::Graphql => match rng.random_range(0..100) {
            0..=59 => (Some(delivery), None),
            60..=84 => (Some(delivery), Some(preview)),
            85..=92 => (Some(preview), None),
            93..=96 => (None, Some(preview)),
            _ => (None, None),
        },
        Route::Preview => match rng.random_range(0..100) {
            0..=44 => (None, Some(preview)),
            45..=84 => (Some(delivery), Some(preview)),
            85..=92 => (Some(Cred::Token(other, Kind::Delivery)), Some(preview)),
            _ => (None, Some(delivery)),
        },
    };
    Req {
        route,
        stack_ok: rng.random_range(0..50) != 0,
        access,
        preview,
        env,
        branch,
    }
}

/// A request no version allows.
fn stranger(rng: &mut SmallRng) -> Req {
    let route = match rng.random_range(0..3) {
        0 => Route::Delivery,
        1 => Route::Preview,
        _ => Route::Graphql,
    };
    let unknown = Cred::Unknown(rng.random());
    let (access, preview, stack_ok) = match rng.random_range(0..5) {
        0 => (Some(unknown), None, true),
        1 => (None, None, true),
        2 => (Some(unknown), Some(unknown), false),
        3 => (None, Some(unknown), true),
        _ => (Some(Cred::Unknown(rng.random())), Some(unknown), true),
    };
    Req {
        route,
        stack_ok,
        access,
        preview,
        env: ENV_PARAMS
            .choose(rng)
            .copied()
            .filter(|_| rng.random_bool(0.3)),
        branch: BRANCH_HEADERS
            .choose(rng)
            .copied()
            .filter(|_| rng.random_bool(0.3)),
    }
}

/// A use of a token on a connection: what a narrowing is compared with.
struct Use {
    n: u32,
    env: Option<&'static str>,
    branch: &'static str,
    /// `confirmed` when its first request was sent.
    since: u64,
    /// The newest version under which one of its answered requests was allowed.
    allowed_at: u64,
    /// Changes up to here were checked for ending it.
    checked: u64,
}

/// Compares an answer with what the versions in `lo..=hi` require and
/// counts it. Returns the newest version under which it was an allowed
/// request, if it was one.
fn judge(
    stats: &Stats,
    inner: &Inner,
    req: &Req,
    path: &str,
    (lo, hi): (u64, u64),
    answer: &Answer,
) -> Option<u64> {
    let from_origin = answer.status == 200 && answer.from_origin && answer.body == path.as_bytes();
    let mut allowed_at = None;
    let mut matched = false;
    let mut any_allow = false;
    let mut expected = Vec::new();
    for v in lo..=hi {
        let expect = inner.expect(v, req);
        match expect {
            Expect::Allow => {
                any_allow = true;
                if from_origin {
                    matched = true;
                    allowed_at = Some(v);
                }
            }
            Expect::Reject(status, reason) => {
                if answer.status == status && answer.reason == reason {
                    matched = true;
                }
            }
        }
        expected.push(expect);
    }
    if matched {
        if allowed_at.is_some() {
            inc(&stats.allowed);
        } else if let Some(i) = REASONS.iter().position(|r| *r == answer.reason) {
            inc(&stats.rejected[i]);
        }
        return allowed_at;
    }
    let what = if answer.status >= 500 {
        inc(&stats.five_xx);
        "5xx"
    } else if answer.status == 200 {
        inc(&stats.wrongly_allowed);
        "wrongly allowed"
    } else if any_allow {
        inc(&stats.wrongly_rejected);
        "wrongly rejected"
    } else {
        inc(&stats.other_mismatch);
        "other mismatch"
    };
    let changes: Vec<String> = (lo..=hi)
        .map(|v| {
            let version = inner.version(v);
            format!("v{v}:{}({:?})", version.kind.name(), version.target)
        })
        .collect();
    stats.detail(format!(
        "{what}: {req:?} path {path}: got {} {:?} (origin {}), expected one of {expected:?} for versions {lo}..={hi} [{}]",
        answer.status,
        answer.reason,
        answer.from_origin,
        changes.join(", "),
    ));
    None
}

/// Whether a change in the request's window ended its own use (a stream or
/// request cut while in flight), given that some version in the window allowed it.
fn own_use_ended(inner: &Inner, req: &Req, (lo, hi): (u64, u64)) -> bool {
    let Some(n) = req.owner() else {
        return false;
    };
    let allowed = (lo..=hi).any(|v| inner.expect(v, req) == Expect::Allow);
    allowed
        && inner
            .ended_between(lo, hi, n, req.env, req.branch_or_main())
            .is_some()
}

fn describe_failure(stats: &Stats, kind: &str, req: &Req, window: (u64, u64), err: &str) {
    stats.detail(format!(
        "{kind} not explained by any change: {req:?} versions {}..={}: {err}",
        window.0, window.1
    ));
}

/// One HTTP/1.1 client: connection after connection, each for one token
/// (`stranger`: for none), until stopped.
pub async fn h1_client(ctx: Arc<Ctx>, id: u64, is_stranger: bool) {
    let mut rng = SmallRng::seed_from_u64(ctx.seed ^ (id << 32));
    while !ctx.stop.is_cancelled() {
        let menu: Vec<Req> = if is_stranger {
            (0..MENU).map(|_| stranger(&mut rng)).collect()
        } else {
            let n = pick_identity(&ctx.history, &mut rng);
            let other = pick_identity(&ctx.history, &mut rng);
            (0..MENU)
                .map(|_| variation(&ctx.history, &mut rng, n, other))
                .collect()
        };
        h1_connection(&ctx, &mut rng, &menu).await;
    }
}

async fn h1_connection(ctx: &Ctx, rng: &mut SmallRng, menu: &[Req]) {
    let stats = &ctx.stats;
    let connected = async {
        let stream = TcpStream::connect(ctx.gateway).await?;
        stream.set_nodelay(true)?;
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)
    };
    let (mut sender, connection) = match connected.await {
        Ok(pair) => pair,
        Err(err) => {
            inc(&stats.transport_errors);
            stats.detail(format!("connect: {err}"));
            tokio::time::sleep(RETRY_PAUSE).await;
            return;
        }
    };
    inc(&stats.h1_connections);
    tokio::spawn(connection);
    let mut uses: Vec<Use> = Vec::new();
    for _ in 0..REQUESTS_PER_CONNECTION {
        if !ctx.may_send().await {
            return;
        }
        let req = menu.choose(rng).unwrap().clone();
        let lo = ctx.history.confirmed();
        // A change confirmed before this request that ended a use on this
        // connection must have closed it: no answer may come.
        let must_fail = {
            let inner = ctx.history.read();
            let mut found = None;
            for u in &mut uses {
                let from = u.allowed_at.max(u.checked);
                if let Some(c) = inner.ended_between(from, lo, u.n, u.env, u.branch) {
                    found = Some((c, u.n, u.env, u.branch));
                }
                u.checked = u.checked.max(lo);
            }
            found
        };
        let rid = ctx.next_id.fetch_add(1, Ordering::Relaxed);
        let (request, path) = build(&req, rid, false);
        let exchange = async {
            sender.ready().await?;
            read_answer(sender.send_request(request).await?).await
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
        let hi = ctx.history.started();
        inc(&stats.requests);
        inc(&stats.h1_requests);
        let inner = ctx.history.read();
        match result {
            Ok(Ok(answer)) => {
                if let Some((c, n, env, branch)) = must_fail {
                    inc(&stats.missed_cuts);
                    stats.detail(format!(
                        "missed cut: token {n} used with env {env:?} branch {branch} on this connection; \
                         change v{c} ({}) ended that use and was confirmed before this request \
                         (confirmed {lo}), yet it was answered {} {:?}",
                        inner.version(c).kind.name(),
                        answer.status,
                        answer.reason
                    ));
                    return;
                }
                if let Some(allowed_at) = judge(stats, &inner, &req, &path, (lo, hi), &answer) {
                    let n = req.owner().unwrap();
                    let branch = req.branch_or_main();
                    match uses
                        .iter_mut()
                        .find(|u| u.n == n && u.env == req.env && u.branch == branch)
                    {
                        Some(u) => u.allowed_at = u.allowed_at.max(allowed_at),
                        None => uses.push(Use {
                            n,
                            env: req.env,
                            branch,
                            since: lo,
                            allowed_at,
                            checked: lo,
                        }),
                    }
                }
            }
            Ok(Err(err)) => {
                let ended = uses.iter().any(|u| {
                    inner
                        .ended_between(u.since, hi, u.n, u.env, u.branch)
                        .is_some()
                }) || own_use_ended(&inner, &req, (lo, hi));
                if ended {
                    inc(&stats.cut_h1);
                } else {
                    inc(&stats.transport_errors);
                    describe_failure(stats, "HTTP/1.1 error", &req, (lo, hi), &err.to_string());
                }
                return;
            }
            Err(_) => {
                inc(&stats.timeouts);
                describe_failure(stats, "timeout", &req, (lo, hi), "no answer in time");
                return;
            }
        }
    }
}

/// One h2c client: a connection with [`H2_STREAMS`] streams in flight, each
/// for a token of its own; reconnects only if the connection is lost (which
/// counts as a failure).
pub async fn h2_client(ctx: Arc<Ctx>, id: u64) {
    let mut rng = SmallRng::seed_from_u64(ctx.seed ^ (id << 32) ^ 0x5eed);
    while !ctx.stop.is_cancelled() {
        let stats = &ctx.stats;
        let connected = async {
            let stream = TcpStream::connect(ctx.gateway).await?;
            stream.set_nodelay(true)?;
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)
        };
        let (sender, connection) = match connected.await {
            Ok(pair) => pair,
            Err(err) => {
                inc(&stats.transport_errors);
                stats.detail(format!("h2 connect: {err}"));
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        inc(&stats.h2_connections);
        let connection = tokio::spawn(connection);
        let mut streams = JoinSet::new();
        loop {
            while streams.len() < H2_STREAMS && !sender.is_closed() && ctx.may_send().await {
                let req = if rng.random_range(0..10) == 0 {
                    stranger(&mut rng)
                } else {
                    let n = pick_identity(&ctx.history, &mut rng);
                    let other = pick_identity(&ctx.history, &mut rng);
                    variation(&ctx.history, &mut rng, n, other)
                };
                let rid = ctx.next_id.fetch_add(1, Ordering::Relaxed);
                let (request, path) = build(&req, rid, true);
                let mut sender = sender.clone();
                let history = Arc::clone(&ctx.history);
                streams.spawn(async move {
                    let lo = history.confirmed();
                    let exchange = async {
                        sender.ready().await?;
                        read_answer(sender.send_request(request).await?).await
                    };
                    let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
                    let hi = history.started();
                    (req, path, (lo, hi), result)
                });
            }
            let Some(done) = streams.join_next().await else {
                break;
            };
            let (req, path, window, result) = done.unwrap();
            inc(&stats.requests);
            inc(&stats.h2_requests);
            let inner = ctx.history.read();
            match result {
                Ok(Ok(answer)) => {
                    judge(stats, &inner, &req, &path, window, &answer);
                }
                Ok(Err(err)) => {
                    if own_use_ended(&inner, &req, window) {
                        inc(&stats.cut_h2);
                    } else {
                        inc(&stats.transport_errors);
                        describe_failure(stats, "h2 stream error", &req, window, &err.to_string());
                    }
                }
                Err(_) => {
                    inc(&stats.timeouts);
                    describe_failure(stats, "h2 timeout", &req, window, "no answer in time");
                }
            }
        }
        // The streams ran out without a stop: the connection went away.
        if sender.is_closed() && !ctx.stop.is_cancelled() {
            inc(&stats.h2_lost);
            stats.detail("an h2c connection was lost".into());
        }
        drop(sender);
        let _ = connection.await;
    }
}
