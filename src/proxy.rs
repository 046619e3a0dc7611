//! The request path: check, decide, forward, stream back.
//!
//! Every request goes through [`handle`]: row 16 ([`check_http`]), then the
//! decision ([`decide`]), then the rate limits of row 15 ([`crate::limits`]),
//! then, for a permit, the session registration, the upstream call and the
//! streaming response. Every refusal is rendered by
//! [`response::rejection`]; nothing refused is forwarded.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::decision::{
    check_http, decide, recheck, BadRequest, Decision, Permit, Refusal, Reject, SessionKind,
    PREVIEW_TOKEN,
};
use crate::metrics::{NO_STACK, NO_TOKEN};
use crate::response::{self, Body, BoxError};
use crate::route::Route;
use crate::server::{ActivityGuard, ConnInfo};
use crate::sessions::RequestGuard;
use crate::upstream::h1pool::Leased;
use crate::Shared;

/// The request id header, added when absent and returned on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that belong to one connection and are never forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers a browser may read on a refusal.
const EXPOSED_HEADERS: &str =
    "x-stackgate-reason, x-request-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining";

/// Why a request was aborted without a response.
#[derive(Debug, thiserror::Error)]
pub enum Aborted {
    #[error("session revoked")]
    Revoked,
    #[error("client body: {0}")]
    ClientBody(String),
    #[error("upstream body stalled longer than request_timeout")]
    UpstreamStalled,
}

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
    let request_id = request_id(&mut parts.headers);

    let mut response = match route_request(&shared, &conn, &parts, body, started, activity).await {
        Ok(response) => response,
        Err(aborted) => {
            tracing::info!(target: "stackgate::access", request_id = %request_id.to_str().unwrap_or(""), error = %aborted, "request aborted");
            return Err(aborted);
        }
    };
    response.headers_mut().insert(REQUEST_ID, request_id);
    Ok(response)
}

/// Holds the request's activity guard until a locally made response's body
/// is sent (a forwarded response's body holds it itself).
fn finish(response: Response<Body>, activity: ActivityGuard) -> Response<Body> {
    response.map(|body| Tracked::new(body, None, Some(activity), None).boxed_unsync())
}

async fn route_request(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &Parts,
    body: Incoming,
    started: Instant,
    activity: ActivityGuard,
) -> Result<Response<Body>, Aborted> {
    let http = if conn.activity.smuggled() {
        Err(BadRequest::Malformed)
    } else {
        check_http(parts, shared.config.server.max_body_bytes)
    };
    if let Err(bad) = http {
        let refusal = Refusal {
            reject: Reject::BadRequest(bad),
            route: None,
            stack: None,
            token: None,
        };
        return Ok(finish(refuse(shared, parts, refusal, started), activity));
    }
    let client = conn.peer.ip();
    match decide(&shared.router, &shared.stacks, parts, started) {
        Decision::Preflight(route) => {
            tracing::info!(
                target: "stackgate::access",
                request_id = %log_id(parts),
                stack = NO_STACK,
                token = NO_TOKEN,
                route = route.kind.name(),
                status = 204,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "preflight"
            );
            Ok(finish(preflight(route, parts), activity))
        }
        Decision::Refuse(refusal) => {
            let refusal = count_failed_auth(shared, client, refusal);
            Ok(finish(refuse(shared, parts, refusal, started), activity))
        }
        Decision::Forward(permit) => match admit(shared, client, &permit) {
            Ok(()) => forward(shared, conn, parts, body, permit, started, activity).await,
            Err(refusal) => Ok(finish(refuse(shared, parts, refusal, started), activity)),
        },
    }
}

/// Row 15 for a permitted request: the client's failed-authentication
/// penalty first, then the token's and the origin's buckets.
///
/// `decide` is pure, so having run it for a penalised client and answering
/// 429 instead is the same, seen from outside, as not evaluating the token
/// at all: the penalty refusal names no token and spends no token budget.
fn admit<'a>(shared: &Shared, client: IpAddr, permit: &Permit<'a>) -> Result<(), Refusal<'a>> {
    let limits = &shared.limits;
    let stack = permit.stack;
    let refusal = |limited: crate::limits::Limited, token: Option<Arc<str>>| Refusal {
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
        .map_err(|limited| refusal(limited, Some(Arc::clone(&permit.token.uid))))
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

/// The request id the client sent, or a new one.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers
        .get(&REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200)
    {
        return id.clone();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    let value = HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID, value.clone());
    value
}

fn log_id(parts: &Parts) -> &str {
    parts
        .headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn refuse(
    shared: &Shared,
    parts: &Parts,
    refusal: Refusal<'_>,
    started: Instant,
) -> Response<Body> {
    let Refusal {
        reject,
        route,
        stack,
        token,
    } = refusal;
    let stack_name = stack.map_or(NO_STACK, |s| &s.name);
    let token_uid = token.as_deref().unwrap_or(NO_TOKEN);
    let route_name = route.map_or("", |r| r.kind.name());
    let metrics = &shared.metrics;
    metrics
        .rejections
        .with_label_values(&[stack_name, reject.reason()])
        .inc();
    if let (Some(stack), Some(uid)) = (stack, &token) {
        shared.usage.record(stack.index, uid, true);
    }
    let outcome = match reject {
        Reject::UpstreamError | Reject::UpstreamTimeout => "upstream_error",
        _ => "rejected",
    };
    metrics
        .requests
        .with_label_values(&[stack_name, token_uid, route_name, outcome])
        .inc();
    let elapsed = started.elapsed();
    if let Some(route) = route {
        shared.durations.request[route.kind.index()].observe(elapsed.as_secs_f64());
    }
    let mut response = response::rejection(&reject);
    tracing::info!(
        target: "stackgate::access",
        request_id = %log_id(parts),
        stack = stack_name,
        token = token_uid,
        route = route_name,
        status = response.status().as_u16(),
        reason = reject.reason(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "refused"
    );
    let headers = response.headers_mut();
    if let (Some(route), Some(origin)) = (route, parts.headers.get(header::ORIGIN)) {
        if let Some(allow) = origin
            .to_str()
            .ok()
            .and_then(|o| route.cors.allow_origin(o))
        {
            if let Ok(value) = HeaderValue::from_str(allow) {
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
                headers.insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static(EXPOSED_HEADERS),
                );
                headers.insert(header::VARY, HeaderValue::from_static("origin"));
            }
        }
    }
    if reject == Reject::MethodNotAllowed {
        if let Some(route) = route {
            headers.insert(
                header::ALLOW,
                HeaderValue::from_static(route.kind.allowed_methods()),
            );
        }
    }
    response
}

/// Answers a CORS preflight from the route's settings.
fn preflight(route: &Route, parts: &Parts) -> Response<Body> {
    let mut response = Response::new(response::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let origin = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .unwrap_or("");
    let headers = response.headers_mut();
    if let Some(allow) = route
        .cors
        .allow_origin(origin)
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(route.kind.allowed_methods()),
        );
        if let Ok(allow_headers) = HeaderValue::from_str(&route.cors.allow_headers) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(route.cors.max_age.as_secs()),
        );
    }
    headers.insert(
        header::VARY,
        HeaderValue::from_static("origin, access-control-request-headers"),
    );
    response
}

async fn forward(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &Parts,
    body: Incoming,
    permit: Permit<'_>,
    started: Instant,
    activity: ActivityGuard,
) -> Result<Response<Body>, Aborted> {
    let refused = |refusal, activity| Ok(finish(refuse(shared, parts, refusal, started), activity));
    // A body to read (GraphQL POSTs) is read by a future on the heap, so that
    // the request future stays small, and bodiless GETs allocate nothing
    // for it (see `upstream::h1pool::Inner::connect_boxed`).
    let read = if body.is_end_stream() {
        Ok(Bytes::new())
    } else {
        Box::pin(read_body(body, shared.config.server.max_body_bytes)).await
    };
    let body = match read {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let reject = Reject::BadRequest(BadRequest::BodyTooLarge);
            return refused(permit_refusal(&permit, reject), activity);
        }
        Err(BodyError::Client(err)) => return Err(Aborted::ClientBody(err)),
    };
    let guard = shared
        .sessions
        .begin(&conn.sessions, &permit, parts.version == Version::HTTP_2);
    if let Some(refusal) = recheck(&shared.router, &shared.stacks, parts, &permit, started) {
        drop(guard);
        return refused(refusal, activity);
    }
    // Requests lease an HTTP/1.1 upstream connection from the light pool,
    // except HTTP/2 ones to an https upstream: they take the shared client,
    // which multiplexes them over h2 if the upstream offers it by ALPN.
    // (Over plain http the shared client would speak HTTP/1.1 too.)
    let pooled = parts.version == Version::HTTP_2 && permit.route.upstream.scheme == Scheme::HTTPS;
    let Some(upstream_request) = upstream_request(parts, &permit, conn, body, pooled) else {
        let reject = Reject::BadRequest(BadRequest::Malformed);
        return refused(permit_refusal(&permit, reject), activity);
    };

    let upstream_started = Instant::now();
    let timeout = shared.config.upstream.request_timeout;
    let call = tokio::time::timeout(timeout, async {
        if pooled {
            let response = shared.client.request(upstream_request).await;
            response
                .map(|response| (response, None))
                .map_err(UpstreamFailure::Pooled)
        } else {
            let upstream = &permit.route.upstream;
            let response = shared.h1pool.send(upstream, upstream_request).await;
            response
                .map(|(response, lease)| (response, Some(lease)))
                .map_err(UpstreamFailure::H1)
        }
    });
    // An HTTP/2 stream is reset on its own; on HTTP/1.1 the connection task
    // drops the whole connection, this future with it.
    let answer = match guard.cancel() {
        Some(cancel) => tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(Aborted::Revoked),
            answer = call => answer,
        },
        None => call.await,
    };
    let kind = permit.route.kind;
    let route_name = kind.name();
    let (upstream, lease) = match answer {
        Ok(Ok(answered)) => answered,
        Ok(Err(err)) => {
            tracing::warn!(route = route_name, error = %err, upstream = %permit.route.upstream.authority, "upstream failed");
            let reject = if connect_timed_out(&err) {
                Reject::UpstreamTimeout
            } else {
                Reject::UpstreamError
            };
            return refused(permit_refusal(&permit, reject), activity);
        }
        Err(_elapsed) => {
            return refused(permit_refusal(&permit, Reject::UpstreamTimeout), activity)
        }
    };
    let durations = &shared.durations;
    durations.upstream[kind.index()].observe(upstream_started.elapsed().as_secs_f64());
    let elapsed = started.elapsed();
    durations.request[kind.index()].observe(elapsed.as_secs_f64());
    shared.usage.forwarded(
        &shared.metrics,
        (permit.stack.index, &permit.stack.name),
        &permit.token.uid,
        kind,
    );
    tracing::info!(
        target: "stackgate::access",
        request_id = %log_id(parts),
        stack = %permit.stack.name,
        token = %permit.token.uid,
        route = route_name,
        status = upstream.status().as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "forwarded"
    );

    let (mut head, body) = upstream.into_parts();
    strip_hop_by_hop(&mut head.headers);
    head.version = Version::HTTP_11;
    // `request_timeout` also bounds every silence of the upstream body, so a
    // stalled origin cannot hold a client connection forever.
    let stall = Some(shared.config.upstream.request_timeout);
    // Read to the end, the body gives its HTTP/1.1 connection back to the pool.
    let body = Leased::new(body, lease);
    let body = Tracked::new(body, Some(guard), Some(activity), stall).boxed_unsync();
    Ok(Response::from_parts(head, body))
}

/// A refusal of a request that had been permitted (its token is known).
fn permit_refusal<'a>(permit: &Permit<'a>, reject: Reject) -> Refusal<'a> {
    Refusal {
        reject,
        route: Some(permit.route),
        stack: Some(permit.stack),
        token: Some(Arc::clone(&permit.token.uid)),
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

/// The request to send upstream: same method, path (prefix stripped), query
/// and headers, minus hop-by-hop headers and an ignored `preview_token`. Its
/// URI is absolute for the `pooled` client, else in origin form (the HTTP/1.1
/// pool sets `Host` itself).
fn upstream_request(
    parts: &Parts,
    permit: &Permit<'_>,
    conn: &ConnInfo,
    body: Bytes,
    pooled: bool,
) -> Option<Request<Full<Bytes>>> {
    let path_and_query = match parts.uri.path_and_query() {
        // No prefix stripped: the client's path and query as they are.
        Some(pq) if std::ptr::eq(pq.path(), permit.path) => pq.clone(),
        _ => {
            let text = match parts.uri.query() {
                Some(query) => format!("{}?{query}", permit.path),
                None => permit.path.to_owned(),
            };
            PathAndQuery::try_from(text).ok()?
        }
    };
    let uri = if pooled {
        let upstream = &permit.route.upstream;
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(upstream.scheme.clone());
        uri.authority = Some(upstream.authority.clone());
        uri.path_and_query = Some(path_and_query);
        Uri::from_parts(uri).ok()?
    } else {
        Uri::from(path_and_query)
    };

    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    if permit.session == SessionKind::Delivery {
        headers.remove(PREVIEW_TOKEN);
    }
    let forwarded_for = match headers.get(&X_FORWARDED_FOR) {
        Some(prior) => {
            let mut value = BytesMut::with_capacity(prior.len() + 2 + conn.client_ip.len());
            value.extend_from_slice(prior.as_bytes());
            value.extend_from_slice(b", ");
            value.extend_from_slice(conn.client_ip.as_bytes());
            HeaderValue::from_maybe_shared(value.freeze()).ok()?
        }
        None => conn.client_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(conn.scheme));
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some(request)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present; most requests have
    // none, most responses only `connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // Other headers that `connection` names are hop-by-hop too.
    let mut listed: Vec<HeaderName> = Vec::new();
    let values = headers.get_all(header::CONNECTION).iter();
    for option in values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let option = option.trim();
        let known = option.is_empty()
            || option.eq_ignore_ascii_case("close")
            || HOP_BY_HOP
                .iter()
                .any(|hop| hop.as_str().eq_ignore_ascii_case(option));
        if !known {
            if let Ok(name) = HeaderName::from_bytes(option.as_bytes()) {
                listed.push(name);
            }
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    for name in listed {
        headers.remove(name);
    }
}

/// A response body that ends in an error the moment its HTTP/2 stream is
/// revoked or its upstream falls silent too long, and that holds the
/// request's session and activity guards until it is done.
pub struct Tracked<B> {
    inner: B,
    cancel: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    stall: Option<Stall>,
    _session: Option<RequestGuard>,
    _activity: Option<ActivityGuard>,
}

/// The longest silence allowed between two frames of an upstream body. The
/// timer is armed only once the body has to wait, so a response that is
/// already buffered (the usual small JSON answer) costs no timer at all.
struct Stall {
    limit: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last armed.
    progressed: bool,
}

impl Stall {
    /// Polls the silence timer; true once the limit is exceeded.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if self.progressed {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.progressed = false;
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<B> Tracked<B> {
    fn new(
        inner: B,
        session: Option<RequestGuard>,
        activity: Option<ActivityGuard>,
        stall: Option<std::time::Duration>,
    ) -> Self {
        let cancel = session
            .as_ref()
            .and_then(RequestGuard::cancel)
            .map(|cancel| Box::pin(cancel.clone().cancelled_owned()));
        let stall = stall.map(|limit| Stall {
            limit,
            timer: None,
            progressed: false,
        });
        Tracked {
            inner,
            cancel,
            stall,
            _session: session,
            _activity: activity,
        }
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(cancel) = self.cancel.as_mut() {
            if cancel.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(Box::new(Aborted::Revoked))));
            }
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(stall) = self.stall.as_mut() {
                    stall.progressed = true;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let expired = self.stall.as_mut().is_some_and(|s| s.poll_expired(cx));
                if expired {
                    Poll::Ready(Some(Err(Box::new(Aborted::UpstreamStalled))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
