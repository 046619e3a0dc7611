//! The request path: check, decide, forward, stream back.
//!
//! Every request goes through [`handle`]: row 16 ([`check_and_read`], which
//! also reads the headers the decision needs), then the decision
//! ([`decide_read`]), then the rate limits of row 15 ([`crate::limits`]),
//! then, for a permit, the session registration and the request's target
//! (`grant`), and the body, the upstream call (the client's head moved
//! into the upstream request) and the streaming response (`forward`).
//! Every refusal is rendered by [`response::refusal`]; nothing refused is
//! forwarded.
//!
//! - [`outgoing`]: what the origin receives.
//! - [`body`]: the response body wrapper (revocation, stalls, guards).
//! - [`access`]: the access line every request ends with.

pub mod access;
pub mod body;
pub mod outgoing;

pub use body::{Aborted, Tracked};
pub use outgoing::REQUEST_ID;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::uri::Scheme;
use http::{HeaderValue, Method, Request, Response, Version};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::conn::{ActivityGuard, ConnInfo};
use crate::decision::{check_and_read, decide_read, recheck, Decision, Permit, Refusal};
use crate::limits::Limited as RateLimited;
use crate::metrics::{NO_STACK, NO_TOKEN};
use crate::registry::{StackRegistry, Token};
use crate::reject::{BadRequest, Reject};
use crate::response::{self, Body};
use crate::route::Route;
use crate::sessions::RequestGuard;
use crate::state::Shared;
use crate::upstream::h1pool::{self, Leased, SendError, UpstreamPermit};
use access::{Access, Outcome, Pending};
use outgoing::{strip_hop_by_hop, upstream_request, Rebuilt, RequestId, Target};

/// Serves one request. An `Err` makes hyper reset the stream (HTTP/2) or
/// close the connection (HTTP/1.1), which is how revocation cuts a request
/// off before its response head.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Aborted> {
    let started = Instant::now();
    let activity = conn.activity.begin(request.version() == Version::HTTP_2);
    let (mut parts, body) = request.into_parts();
    let id = RequestId::of(&parts.headers);
    let routed = route_request(&shared, &conn, &mut parts, &id, body, started, activity);
    let mut response = routed.await?;
    response.headers_mut().insert(REQUEST_ID, id.value);
    Ok(response)
}

/// Holds the request's activity guard until a locally made response's body
/// is sent (a forwarded response's body holds it itself).
fn finish(response: Response<Body>, activity: ActivityGuard) -> Response<Body> {
    response.map(|body| Tracked::new(body, None, Some(activity), None).boxed_unsync())
}

/// Everything but the request id: `parts` is the request's head, which a
/// forwarded request moves into the upstream request (it is left empty).
async fn route_request(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &mut Parts,
    id: &RequestId,
    body: Incoming,
    started: Instant,
    activity: ActivityGuard,
) -> Result<Response<Body>, Aborted> {
    let http = if conn.activity.smuggled() {
        Err(BadRequest::Malformed)
    } else {
        check_and_read(parts, shared.config.server.max_body_bytes)
    };
    let origin = || parts.headers.get(header::ORIGIN);
    let headers = match http {
        Ok(headers) => headers,
        Err(bad) => {
            let refusal = Refusal {
                reject: Reject::BadRequest(bad),
                route: None,
                stack: None,
                token: None,
            };
            let response = refuse(shared, id.text(), origin(), refusal, started);
            return Ok(finish(response, activity));
        }
    };
    let client = conn.peer.ip();
    let (router, stacks) = (&shared.router, &shared.stacks);
    let permit = match decide_read(router, stacks, parts, headers, &conn.digests, started) {
        Decision::Preflight(route) => {
            let access = Access {
                route: route.kind.name(),
                ..Access::anonymous(id.text())
            };
            access.write(Outcome::Preflight, started.elapsed());
            let response = response::preflight(route, origin());
            return Ok(finish(response, activity));
        }
        Decision::Refuse(refusal) => {
            let refusal = count_failed_auth(shared, client, refusal);
            let response = refuse(shared, id.text(), origin(), refusal, started);
            return Ok(finish(response, activity));
        }
        Decision::Forward(permit) => permit,
    };
    if let Err(refusal) = admit(shared, client, &permit) {
        let response = refuse(shared, id.text(), origin(), refusal, started);
        return Ok(finish(response, activity));
    }
    let granted = match grant(shared, conn, parts, permit, started) {
        Ok(granted) => granted,
        Err(refusal) => {
            let response = refuse(shared, id.text(), origin(), refusal, started);
            return Ok(finish(response, activity));
        }
    };
    // What was read from the request is done with: its head can move into
    // the upstream request.
    forward(shared, conn, parts, id, body, granted, started, activity).await
}

/// Row 15 for a permitted request: the client's failed-authentication
/// penalty first, then the token's and the origin's buckets.
///
/// `decide` is pure, so having run it for a penalised client and answering
/// 429 instead is the same, seen from outside, as not evaluating the token
/// at all: the penalty refusal names no token and spends no token budget.
fn admit<'r>(shared: &Shared, client: IpAddr, permit: &Permit<'r, '_>) -> Result<(), Refusal<'r>> {
    let limits = &shared.limits;
    let stack = permit.stack;
    let refusal = |limited: RateLimited, token: Option<Arc<Token>>| Refusal {
        reject: limited.reject(),
        route: Some(permit.route),
        stack: Some(stack),
        token,
    };
    limits
        .penalized(stack.index, client)
        .map_err(|limited| refusal(limited, None))?;
    limits
        .admit(stack.index, &permit.token)
        .map_err(|limited| refusal(limited, Some(Arc::clone(&permit.token))))
}

/// A failed authentication (rows 8 to 14) spends a cell of the client's
/// bucket; once that is empty the answer is 429 whatever the token, so that
/// it tells a brute-forcer nothing (see [`crate::limits`]).
fn count_failed_auth<'a>(shared: &Shared, client: IpAddr, refusal: Refusal<'a>) -> Refusal<'a> {
    let Some(stack) = refusal.stack.filter(|_| refusal.reject.is_failed_auth()) else {
        return refusal;
    };
    match shared.limits.failed_auth(stack.index, client) {
        Ok(()) => refusal,
        Err(limited) => Refusal {
            reject: limited.reject(),
            route: refusal.route,
            stack: Some(stack),
            token: None,
        },
    }
}

/// Counts, logs and answers a refusal (`origin`: the request's `Origin`).
fn refuse(
    shared: &Shared,
    request_id: &str,
    origin: Option<&HeaderValue>,
    refusal: Refusal<'_>,
    started: Instant,
) -> Response<Body> {
    let Refusal {
        reject,
        route,
        stack,
        token,
    } = refusal;
    let access = Access {
        request_id,
        stack: stack.map_or(NO_STACK, |s| &s.name),
        token: token.as_ref().map_or(NO_TOKEN, |t| &t.uid),
        route: route.map_or("", |r| r.kind.name()),
    };
    let metrics = &shared.metrics;
    metrics
        .rejections
        .with_label_values(&[access.stack, reject.reason()])
        .inc();
    if let Some(token) = &token {
        token.usage.refused();
    }
    let outcome = match reject {
        Reject::UpstreamError | Reject::UpstreamTimeout | Reject::UpstreamBusy => "upstream_error",
        _ => "rejected",
    };
    metrics
        .requests
        .with_label_values(&[access.stack, access.token, access.route, outcome])
        .inc();
    if let (Some(stack), Some(token)) = (stack, &token) {
        // Recorded above for a token the registry may have dropped since.
        shared.forget_if_gone(stack, &token.uid, None);
    }
    let elapsed = started.elapsed();
    if let Some(route) = route {
        shared.durations.request[route.kind.index()].observe(elapsed.as_secs_f64());
    }
    let response = response::refusal(&reject, route, origin);
    let status = response.status().as_u16();
    access.write(Outcome::Refused(status, reject.reason()), elapsed);
    response
}

/// A permitted request with its session registered, as far as forwarding
/// it needs: nothing of it borrows the request any more.
struct Granted<'r> {
    route: &'r Route,
    stack: &'r Arc<StackRegistry>,
    token: Arc<Token>,
    /// The registry version that decided it.
    version: u64,
    guard: RequestGuard,
    target: Target<'r>,
    /// Through the shared pooled client rather than the HTTP/1.1 pool.
    pooled: bool,
}

/// Registers a permitted request's session, checks that the permit still
/// holds ([`recheck`]) and decides the request's [`Target`]: all that
/// reads the request before its head moves into the upstream request. The
/// session is registered before the body is read, so that a revocation
/// cuts an upload too.
fn grant<'r>(
    shared: &'r Shared,
    conn: &ConnInfo,
    parts: &Parts,
    permit: Permit<'r, '_>,
    now: Instant,
) -> Result<Granted<'r>, Refusal<'r>> {
    let http2 = parts.version == Version::HTTP_2;
    let guard = shared.sessions.begin(&conn.sessions, &permit, http2);
    let (router, stacks) = (&shared.router, &shared.stacks);
    if let Some(refusal) = recheck(router, stacks, parts, &permit, &conn.digests, now) {
        drop(guard);
        // The token's bucket was made on admission; it may be gone since.
        shared.forget_if_gone(permit.stack, &permit.token.uid, None);
        return Err(refusal);
    }
    // A revoked HTTP/2 stream is reset on its own: its task is dropped once
    // the request's token is cancelled, the request's future with it,
    // whatever hyper is waiting for. On HTTP/1.1 the connection task drops
    // the connection.
    if let Some(cancel) = guard.cancel() {
        crate::conn::reset_stream_on(cancel);
    }
    // Requests lease an HTTP/1.1 upstream connection from the light pool,
    // except HTTP/2 ones to an https upstream: they take the shared client,
    // which multiplexes them over h2 if the upstream offers it by ALPN.
    // (Over plain http the shared client would speak HTTP/1.1 too.)
    let pooled = http2 && permit.route.upstream.scheme == Scheme::HTTPS;
    let Some(target) = Target::of(parts, &permit, pooled) else {
        return Err(permit_refusal(
            &permit,
            Reject::BadRequest(BadRequest::Malformed),
        ));
    };
    Ok(Granted {
        route: permit.route,
        stack: permit.stack,
        token: permit.token,
        version: permit.version,
        guard,
        target,
        pooled,
    })
}

/// Reads a granted request's body, sends the request upstream (the
/// client's head moved into it) and streams the response back.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &mut Parts,
    id: &RequestId,
    body: Incoming,
    granted: Granted<'_>,
    started: Instant,
    activity: ActivityGuard,
) -> Result<Response<Body>, Aborted> {
    let Granted {
        route,
        stack,
        token,
        version,
        guard,
        target,
        pooled,
    } = granted;
    let mut line = Pending::new(
        Access {
            request_id: id.text(),
            stack: &stack.name,
            token: &token.uid,
            route: route.kind.name(),
        },
        started,
    );
    let refused = |line: &mut Pending<'_>, reject, origin: Option<&HeaderValue>, activity| {
        line.hand_off();
        let refusal = Refusal {
            reject,
            route: Some(route),
            stack: Some(stack),
            token: Some(Arc::clone(&token)),
        };
        let response = refuse(shared, id.text(), origin, refusal, started);
        Ok(finish(response, activity))
    };
    // A body to read (GraphQL POSTs) is read by a future on the heap, so that
    // the request future stays small, and bodiless GETs allocate nothing
    // for it (see `upstream::h1pool::Inner::connect_boxed`).
    // GET and HEAD may carry no body at all (row 16): an h2 client can send
    // DATA frames without a `content-length` for `check_http` to see.
    let bodiless = parts.method == Method::GET || parts.method == Method::HEAD;
    let read = if body.is_end_stream() {
        Ok(Bytes::new())
    } else {
        let max = if bodiless {
            0
        } else {
            shared.config.server.max_body_bytes
        };
        Box::pin(read_body(body, max)).await
    };
    let body = match read {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let bad = if bodiless {
                BadRequest::Malformed
            } else {
                BadRequest::BodyTooLarge
            };
            let origin = parts.headers.get(header::ORIGIN);
            return refused(&mut line, Reject::BadRequest(bad), origin, activity);
        }
        Err(BodyError::Client(err)) => {
            let aborted = Aborted::ClientBody(err);
            line.write(Outcome::Aborted(&aborted));
            return Err(aborted);
        }
    };
    let http2 = parts.version == Version::HTTP_2;
    let Rebuilt { request, origin } = upstream_request(parts, target, id, conn, body);
    let Some(request) = request else {
        let reject = Reject::BadRequest(BadRequest::Malformed);
        return refused(&mut line, reject, origin.as_ref(), activity);
    };
    let refused =
        |line: &mut Pending<'_>, reject, activity| refused(line, reject, origin.as_ref(), activity);

    let upstream_started = Instant::now();
    let call = async {
        let upstream = &route.upstream;
        if pooled {
            let held = shared
                .h1pool
                .permit(upstream)
                .await
                .map_err(UpstreamFailure::H1)?;
            let response = shared.client.request(request).await;
            response
                .map(|response| (response, Lease::Pooled(held)))
                .map_err(UpstreamFailure::Pooled)
        } else {
            let response = shared.h1pool.send(upstream, request).await;
            response
                .map(|(response, lease)| (response, Lease::H1(lease)))
                .map_err(UpstreamFailure::H1)
        }
    };
    // `request_timeout` bounds the call: on HTTP/1.1 through the
    // connection's watchdog, on HTTP/2 (a task per stream) with a timer.
    let answer = if http2 {
        let timeout = shared.config.upstream.request_timeout;
        tokio::time::timeout(timeout, call).await.ok()
    } else {
        let activity = activity.activity();
        activity
            .within_request_timeout(upstream_started, call)
            .await
    };
    let kind = route.kind;
    let (upstream, lease) = match answer {
        Some(Ok(answered)) => answered,
        Some(Err(err)) => {
            tracing::warn!(route = line.access().route, error = %err, upstream = %route.upstream.authority, "upstream failed");
            let reject = if matches!(err, UpstreamFailure::H1(SendError::Busy)) {
                Reject::UpstreamBusy
            } else if connect_timed_out(&err) {
                Reject::UpstreamTimeout
            } else {
                Reject::UpstreamError
            };
            return refused(&mut line, reject, activity);
        }
        None => return refused(&mut line, Reject::UpstreamTimeout, activity),
    };
    // One clock read for the two histograms and the access line.
    let answered = Instant::now();
    let durations = &shared.durations;
    let upstream_took = answered.saturating_duration_since(upstream_started);
    durations.upstream[kind.index()].observe(upstream_took.as_secs_f64());
    let elapsed = answered.saturating_duration_since(started);
    durations.request[kind.index()].observe(elapsed.as_secs_f64());
    shared.record_forwarded(stack, &token, kind, version);
    line.write_elapsed(Outcome::Forwarded(upstream.status().as_u16()), elapsed);

    let (mut head, body) = upstream.into_parts();
    strip_hop_by_hop(&mut head.headers);
    head.version = Version::HTTP_11;
    // `request_timeout` also bounds every silence of the upstream body, so a
    // stalled origin cannot hold a client connection forever.
    let stall = Some(shared.config.upstream.request_timeout);
    // Read to the end, the body gives its HTTP/1.1 connection back to the pool.
    let body = match lease {
        Lease::H1(lease) => Leased::new(body, Some(lease)),
        Lease::Pooled(permit) => Leased::new(body, None).holding(Some(permit)),
    };
    let body = Tracked::new(body, Some(guard), Some(activity), stall).boxed_unsync();
    Ok(Response::from_parts(head, body))
}

/// A refusal of a request that had been permitted (its token is known).
fn permit_refusal<'r>(permit: &Permit<'r, '_>, reject: Reject) -> Refusal<'r> {
    Refusal {
        reject,
        route: Some(permit.route),
        stack: Some(permit.stack),
        token: Some(Arc::clone(&permit.token)),
    }
}

/// Whether the upstream could not even be reached within `connect_timeout`:
/// that is a timeout (504, row 17), not a refusal (502).
fn connect_timed_out(err: &UpstreamFailure) -> bool {
    match err {
        UpstreamFailure::Pooled(err) => err.is_connect() && crate::upstream::timed_out(err),
        UpstreamFailure::H1(err) => err.is_connect_timeout(),
    }
}

/// What a forwarded response holds until its body is done: its HTTP/1.1
/// connection (with its permit), or its permit alone (shared pooled client).
enum Lease {
    H1(h1pool::Lease),
    Pooled(UpstreamPermit),
}

/// Why an upstream call failed, in the shared pool or the HTTP/1.1 one.
#[derive(Debug, thiserror::Error)]
enum UpstreamFailure {
    #[error(transparent)]
    Pooled(hyper_util::client::legacy::Error),
    #[error(transparent)]
    H1(crate::upstream::h1pool::SendError),
}

enum BodyError {
    TooLarge,
    Client(String),
}

/// Reads a request body up to `max` bytes (GraphQL queries; GETs have none).
async fn read_body(body: Incoming, max: u64) -> Result<Bytes, BodyError> {
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(err) => Err(BodyError::Client(err.to_string())),
    }
}
