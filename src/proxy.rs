//! The request path: check, decide, forward, stream back.
//!
//! Every request goes through [`handle`]: row 16 ([`check_http`]), then the
//! decision ([`decide`]), then the rate limits of row 15 ([`crate::limits`]),
//! then, for a permit, the session registration, the upstream call and the
//! streaming response. Every refusal is rendered by
//! [`response::rejection`]; nothing refused is forwarded.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::decision::{
    check_http, decide, BadRequest, Decision, Permit, Refusal, Reject, SessionKind, PREVIEW_TOKEN,
};
use crate::metrics::{NO_STACK, NO_TOKEN};
use crate::response::{self, Body, BoxError};
use crate::route::Route;
use crate::server::ConnInfo;
use crate::Shared;

/// The request id header, added when absent and returned on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that belong to one connection and are never forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
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

    let mut response = match route_request(&shared, &conn, &parts, body, started).await {
        Ok(response) => response,
        Err(aborted) => {
            tracing::info!(target: "stackgate::access", request_id = %request_id.to_str().unwrap_or(""), error = %aborted, "request aborted");
            return Err(aborted);
        }
    };
    response.headers_mut().insert(REQUEST_ID, request_id);
    Ok(response.map(|body| Tracked::new(body, None, Some(activity), None).boxed_unsync()))
}

async fn route_request(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &Parts,
    body: Incoming,
    started: Instant,
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
        return Ok(refuse(shared, parts, refusal, started));
    }
    let client = conn.peer.ip();
    match decide(&shared.router, &shared.stacks, parts, started) {
        Decision::Preflight(route) => Ok(preflight(route, parts)),
        Decision::Refuse(refusal) => {
            let refusal = count_failed_auth(shared, client, refusal);
            Ok(refuse(shared, parts, refusal, started))
        }
        Decision::Forward(permit) => match admit(shared, client, &permit) {
            Ok(()) => forward(shared, conn, parts, body, permit, started).await,
            Err(refusal) => Ok(refuse(shared, parts, refusal, started)),
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
    let id: u128 = rand::random();
    let value = HeaderValue::from_str(&format!("{id:032x}"))
        .unwrap_or_else(|_| HeaderValue::from_static("0"));
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
        metrics
            .request_duration
            .with_label_values(&[route.kind.name()])
            .observe(elapsed.as_secs_f64());
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
) -> Result<Response<Body>, Aborted> {
    let body = match read_body(body, shared.config.server.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let refusal = permit_refusal(&permit, Reject::BadRequest(BadRequest::BodyTooLarge));
            return Ok(refuse(shared, parts, refusal, started));
        }
        Err(BodyError::Client(err)) => return Err(Aborted::ClientBody(err)),
    };
    let guard = shared
        .sessions
        .begin(&conn.sessions, &permit, parts.version == Version::HTTP_2);
    let upstream_request = match upstream_request(parts, &permit, conn.peer, conn.scheme, body) {
        Some(request) => request,
        None => {
            let refusal = permit_refusal(&permit, Reject::BadRequest(BadRequest::Malformed));
            return Ok(refuse(shared, parts, refusal, started));
        }
    };

    let upstream_started = Instant::now();
    let timeout = shared.config.upstream.request_timeout;
    let call = tokio::time::timeout(timeout, shared.client.request(upstream_request));
    let answer = tokio::select! {
        biased;
        () = guard.cancel.cancelled() => return Err(Aborted::Revoked),
        answer = call => answer,
    };
    let route_name = permit.route.kind.name();
    let upstream = match answer {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            tracing::warn!(route = route_name, error = %err, upstream = %permit.route.upstream.authority, "upstream failed");
            let refusal = permit_refusal(&permit, Reject::UpstreamError);
            return Ok(refuse(shared, parts, refusal, started));
        }
        Err(_elapsed) => {
            let refusal = permit_refusal(&permit, Reject::UpstreamTimeout);
            return Ok(refuse(shared, parts, refusal, started));
        }
    };
    let metrics = &shared.metrics;
    metrics
        .upstream_duration
        .with_label_values(&[route_name])
        .observe(upstream_started.elapsed().as_secs_f64());
    let elapsed = started.elapsed();
    metrics
        .request_duration
        .with_label_values(&[route_name])
        .observe(elapsed.as_secs_f64());
    metrics
        .requests
        .with_label_values(&[
            &permit.stack.name,
            &permit.token.uid,
            route_name,
            "forwarded",
        ])
        .inc();
    shared
        .usage
        .record(permit.stack.index, &permit.token.uid, false);
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
    let body = Tracked::new(body, Some(guard), None, stall).boxed_unsync();
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

enum BodyError {
    TooLarge,
    Client(String),
}

/// Reads a request body up to `max` bytes (GraphQL queries; GETs have none).
async fn read_body(body: Incoming, max: u64) -> Result<Bytes, BodyError> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(err) => Err(BodyError::Client(err.to_string())),
    }
}

/// The request to send upstream: same method, path (prefix stripped), query
/// and headers, minus hop-by-hop headers and an ignored `preview_token`.
fn upstream_request(
    parts: &Parts,
    permit: &Permit<'_>,
    peer: SocketAddr,
    scheme: &'static str,
    body: Bytes,
) -> Option<Request<Full<Bytes>>> {
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{}?{query}", permit.path),
        None => permit.path.to_owned(),
    };
    let upstream = &permit.route.upstream;
    let uri = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(PathAndQuery::try_from(path_and_query).ok()?)
        .build()
        .ok()?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    if permit.session == SessionKind::Delivery {
        headers.remove(PREVIEW_TOKEN);
    }
    let client_ip = peer.ip().to_string();
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {client_ip}"),
        None => client_ip,
    };
    headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(&forwarded_for).ok()?);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some(request)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// A response body that ends in an error the moment its request is revoked,
/// and that holds the request's session and activity guards until it is done.
pub struct Tracked<B> {
    inner: B,
    cancel: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The longest silence allowed between two frames of an upstream body.
    stall: Option<(std::time::Duration, Pin<Box<tokio::time::Sleep>>)>,
    _session: Option<crate::sessions::RequestGuard>,
    _activity: Option<crate::server::ActivityGuard>,
}

impl<B> Tracked<B> {
    fn new(
        inner: B,
        session: Option<crate::sessions::RequestGuard>,
        activity: Option<crate::server::ActivityGuard>,
        stall: Option<std::time::Duration>,
    ) -> Self {
        let cancel = session
            .as_ref()
            .map(|guard| Box::pin(guard.cancel.clone().cancelled_owned()));
        let stall = stall.map(|limit| (limit, Box::pin(tokio::time::sleep(limit))));
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
                if let Some((limit, sleep)) = self.stall.as_mut() {
                    let deadline = Instant::now() + *limit;
                    sleep.as_mut().reset(deadline);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let stalled = match self.stall.as_mut() {
                    Some((_, sleep)) => sleep.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if stalled {
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
