//! A fake Contentstack CMA serving `GET /v3/stacks/delivery_tokens`.
//!
//! It listens on `127.0.0.1:0` (HTTP/1.1 and h2c), records every call, and answers according to
//! the current [`Mode`]. In the modes that answer with tokens (`Normal`, `LoopingPages`,
//! `Empty`) a missing `api_key` header gets 412 (code 109) and a missing credential (`authtoken`
//! or `authorization: Bearer ...`) gets 401 (code 105); any values are accepted. Everything stops
//! when the [`FakeCma`] is dropped.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long the `wait_for_*` helpers wait before panicking.
const WAIT_DEADLINE: Duration = Duration::from_secs(10);
/// The path the fake serves.
pub const TOKENS_PATH: &str = "/v3/stacks/delivery_tokens";
/// Page size used when `limit` is absent, and the largest one honoured.
pub const MAX_LIMIT: usize = 100;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the fake answers `GET /v3/stacks/delivery_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Paginated token list (`skip`, `limit`, `include_count`).
    #[default]
    Normal,
    /// That status with a Contentstack error body (`error_code` = the status).
    Status(u16),
    /// 200 with the truncated body `{"tokens": [`.
    InvalidJson,
    /// 200 with `{"tokens": {"uid": 1}}`.
    WrongShape,
    /// Never answers (until the fake is dropped).
    Hang,
    /// 429 with `Retry-After`, `X-RateLimit-Limit: 10`, `X-RateLimit-Remaining: 0`.
    RateLimited { retry_after_secs: u64 },
    /// Ignores `skip`: always the first page, so a naive client pages forever (needs at least
    /// `limit` tokens for the page to be full).
    LoopingPages,
    /// 200 `{"tokens":[]}`.
    Empty,
    /// As `Normal`, but the body stops halfway until [`FakeCma::release`]
    /// (or the fake is dropped); [`FakeCma::hanging`] counts such pages.
    HangMidPage,
}

/// One request the fake received (any path, any method).
#[derive(Debug, Clone)]
pub struct CmaCall {
    pub path: String,
    /// Percent-decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
}

impl CmaCall {
    /// The value of header `name` as a string, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    tokens: Vec<Value>,
    mode: Mode,
    calls: Vec<CmaCall>,
    /// `X-RateLimit-Remaining` on successful answers, when set.
    remaining: Option<u32>,
    /// Pages that stopped halfway and are still held.
    hanging: usize,
    /// Pages ever held halfway.
    hung: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    /// Bumped by [`FakeCma::release`]: held pages go on.
    released: watch::Sender<u64>,
}

impl Shared {
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let state = self.state.lock().unwrap();
        f(&state)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        {
            let mut state = self.state.lock().unwrap();
            f(&mut state);
        }
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// A running fake CMA; stops (listener and connections) when dropped.
pub struct FakeCma {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl FakeCma {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the token list served from now on.
    pub fn set_tokens(&self, tokens: Vec<Value>) {
        self.shared.update(|s| s.tokens = tokens);
    }

    /// Changes how the following requests are answered.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.update(|s| s.mode = mode);
    }

    /// Sends `X-RateLimit-Limit: 10` and `X-RateLimit-Remaining: n` on
    /// successful answers (`None`: no rate-limit headers).
    pub fn set_rate_limit_remaining(&self, remaining: Option<u32>) {
        self.shared.update(|s| s.remaining = remaining);
    }

    /// Every request received so far, in arrival order.
    pub fn calls(&self) -> Vec<CmaCall> {
        self.shared.read(|s| s.calls.clone())
    }

    /// Pages held halfway right now ([`Mode::HangMidPage`]).
    pub fn hanging(&self) -> usize {
        self.shared.read(|s| s.hanging)
    }

    /// Lets every page held halfway finish.
    pub fn release(&self) {
        self.shared.released.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Waits until at least `n` pages were held halfway; panics after 10 s.
    pub async fn wait_for_hung(&self, n: usize) {
        let mut rx = self.shared.changed.subscribe();
        let waited = tokio::time::timeout(WAIT_DEADLINE, async {
            while self.shared.read(|s| s.hung) < n {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        assert!(waited.is_ok(), "fake CMA: no page held halfway");
    }

    /// The number of requests received so far.
    pub fn call_count(&self) -> usize {
        self.shared.read(|s| s.calls.len())
    }

    /// Waits until at least `n` requests were received; panics after 10 s.
    pub async fn wait_for_calls(&self, n: usize) {
        let mut rx = self.shared.changed.subscribe();
        let waited = tokio::time::timeout(WAIT_DEADLINE, async {
            loop {
                if self.call_count() >= n {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "fake CMA: timed out after {WAIT_DEADLINE:?} waiting for {n} call(s) \
                 (calls so far: {})",
                self.call_count()
            );
        }
    }
}

impl Drop for FakeCma {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts a fake CMA on `127.0.0.1:0` with no tokens, in [`Mode::Normal`].
pub async fn spawn_cma() -> FakeCma {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("fake CMA: bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("fake CMA: local_addr");
    let (changed, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            tokens: Vec::new(),
            mode: Mode::Normal,
            remaining: None,
            calls: Vec::new(),
            hanging: 0,
            hung: 0,
        }),
        changed,
        released: watch::Sender::new(0),
    });
    let cancel = CancellationToken::new();
    tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
    FakeCma {
        addr,
        shared,
        cancel,
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc_cancel = cancel.clone();
            let svc = service_fn(move |req| serve(shared.clone(), svc_cancel.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let (parts, body) = req.into_parts();
    // Drain the request body, if any.
    let _ = body.collect().await?;
    let call = CmaCall {
        path: parts.uri.path().to_owned(),
        query: parse_query(parts.uri.query().unwrap_or("")),
        headers: parts.headers.clone(),
    };
    let mut mode = Mode::Normal;
    let mut tokens = Vec::new();
    let mut remaining = None;
    shared.update(|s| {
        mode = s.mode;
        tokens = s.tokens.clone();
        remaining = s.remaining;
        s.calls.push(call.clone());
    });

    if call.path != TOKENS_PATH {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            404,
            "The requested URL was not found on this server.",
            json!({}),
        ));
    }
    if parts.method != Method::GET {
        return Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            405,
            "Method not allowed.",
            json!({}),
        ));
    }

    match mode {
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(error_response(
                status,
                u64::from(status.as_u16()),
                "Fake CMA error.",
                json!({}),
            ))
        }
        Mode::InvalidJson => Ok(raw_json(StatusCode::OK, r#"{"tokens": ["#)),
        Mode::WrongShape => Ok(raw_json(StatusCode::OK, r#"{"tokens": {"uid": 1}}"#)),
        Mode::Hang => {
            cancel.cancelled().await;
            Err("fake CMA shutting down".into())
        }
        Mode::RateLimited { retry_after_secs } => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                429,
                "Too many requests. Please try again later.",
                json!({}),
            );
            let headers = response.headers_mut();
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs),
            );
            headers.insert("x-ratelimit-limit", HeaderValue::from_static("10"));
            headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
            Ok(response)
        }
        Mode::Normal | Mode::LoopingPages | Mode::Empty | Mode::HangMidPage => {
            if let Some(rejection) = check_credentials(&call) {
                return Ok(rejection);
            }
            if mode == Mode::Empty {
                tokens.clear();
            }
            let skip = match mode {
                Mode::LoopingPages => 0,
                _ => call
                    .query_param("skip")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0),
            };
            let limit = call
                .query_param("limit")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(MAX_LIMIT)
                .min(MAX_LIMIT);
            let total = tokens.len();
            let page: Vec<Value> = tokens.into_iter().skip(skip).take(limit).collect();
            let mut body = json!({ "tokens": page });
            if call.query_param("include_count") == Some("true") {
                body["count"] = json!(total);
            }
            let mut response = raw_json(StatusCode::OK, &body.to_string());
            if mode == Mode::HangMidPage {
                response.extensions_mut().insert(HoldHalfway);
            }
            if let Some(remaining) = remaining {
                let headers = response.headers_mut();
                headers.insert("x-ratelimit-limit", HeaderValue::from_static("10"));
                headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
            }
            Ok(response)
        }
    }
}

/// Marks a page whose body [`serve`] holds halfway.
#[derive(Clone, Copy)]
struct HoldHalfway;

type ServeBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// [`handle`], with the body of a [`Mode::HangMidPage`] page held halfway.
async fn serve(
    shared: Arc<Shared>,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<ServeBody>, BoxError> {
    let response = handle(Arc::clone(&shared), cancel.clone(), req).await?;
    if response.extensions().get::<HoldHalfway>().is_none() {
        return Ok(response.map(|b| b.map_err(|never| match never {}).boxed()));
    }
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let (head, tail) = body.split_at(body.len() / 2);
    let (head, tail) = (Bytes::copy_from_slice(head), Bytes::copy_from_slice(tail));
    // The length is announced, so the client waits for the rest.
    parts.headers.insert(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(body.len() as u64),
    );
    let mut released = shared.released.subscribe();
    released.mark_unchanged();
    let frames = futures_util::stream::unfold(0u8, move |step| {
        let shared = Arc::clone(&shared);
        let cancel = cancel.clone();
        let (head, tail) = (head.clone(), tail.clone());
        let mut released = released.clone();
        async move {
            match step {
                0 => {
                    shared.update(|s| {
                        s.hanging += 1;
                        s.hung += 1;
                    });
                    Some((Ok::<_, BoxError>(http_body::Frame::data(head)), 1))
                }
                1 => {
                    tokio::select! {
                        _ = released.changed() => {}
                        _ = cancel.cancelled() => {}
                    }
                    shared.update(|s| s.hanging -= 1);
                    Some((Ok(http_body::Frame::data(tail)), 2))
                }
                _ => None,
            }
        }
    });
    let body = http_body_util::StreamBody::new(frames).boxed();
    Ok(Response::from_parts(parts, body))
}

/// 412 without `api_key`, 401 without `authtoken` / `authorization: Bearer ...`.
fn check_credentials(call: &CmaCall) -> Option<Response<Full<Bytes>>> {
    if call.header("api_key").is_none_or(|v| v.is_empty()) {
        return Some(error_response(
            StatusCode::PRECONDITION_FAILED,
            109,
            "We can't find that Stack. Please try again.",
            json!({ "api_key": ["is not valid."] }),
        ));
    }
    let authtoken = call.header("authtoken").is_some_and(|v| !v.is_empty());
    let bearer = call.header("authorization").is_some_and(|v| {
        v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") && !v[7..].trim().is_empty()
    });
    if authtoken || bearer {
        return None;
    }
    Some(error_response(
        StatusCode::UNAUTHORIZED,
        105,
        "You're not allowed in here unless you're logged in.",
        json!({ "authtoken": ["is not valid."] }),
    ))
}

fn error_response(
    status: StatusCode,
    code: u64,
    message: &str,
    errors: Value,
) -> Response<Full<Bytes>> {
    let body = json!({
        "error_message": message,
        "error_code": code,
        "errors": errors,
    });
    raw_json(status, &body.to_string())
}

fn raw_json(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Fixed timestamps and user uids, as in the CMA fixture.
const USER_UID: &str = "blt7d123cc321ee12e";
const ENV_CREATED_AT: &str = "2019-07-15T07:26:10.915Z";
const TOKEN_CREATED_AT: &str = "2019-07-19T07:41:05.070Z";

/// A deterministic `_metadata.uid` like `cs766df728fb56e697`.
fn metadata_uid(token_uid: &str, module: &str) -> String {
    let mut hasher = DefaultHasher::new();
    token_uid.hash(&mut hasher);
    module.hash(&mut hasher);
    format!("cs{:016x}", hasher.finish())
}

/// One delivery token in the shape of `GET /v3/stacks/delivery_tokens`
/// (`fixtures/cma_get_all_delivery_tokens.json`): an `environment` scope module for
/// `env = (name, uid)`, then a `branch` module if `branches` is given, then a `branch_alias`
/// module if `aliases` is given; `preview_token` only if given.
pub fn token_json(
    uid: &str,
    name: &str,
    token: &str,
    preview_token: Option<&str>,
    env: (&str, &str),
    branches: Option<&[&str]>,
    aliases: Option<&[&str]>,
) -> Value {
    let (env_name, env_uid) = env;
    let mut scope = vec![json!({
        "environments": [{
            "deploy_content": false,
            "servers": [],
            "urls": [{ "url": "http://www.sample.com", "locale": "en-us" }],
            "name": env_name,
            "app_user_object_uid": "system",
            "uid": env_uid,
            "created_by": USER_UID,
            "updated_by": USER_UID,
            "created_at": ENV_CREATED_AT,
            "updated_at": ENV_CREATED_AT,
            "ACL": [],
            "_version": 1,
            "tags": [],
        }],
        "module": "environment",
        "acl": { "read": true },
    })];
    if let Some(branches) = branches {
        scope.push(json!({
            "module": "branch",
            "acl": { "read": true },
            "branches": branches,
            "_metadata": { "uid": metadata_uid(uid, "branch") },
        }));
    }
    if let Some(aliases) = aliases {
        scope.push(json!({
            "module": "branch_alias",
            "acl": { "read": true },
            "branch_aliases": aliases,
            "_metadata": { "uid": metadata_uid(uid, "branch_alias") },
        }));
    }
    let mut value = json!({
        "name": name,
        "scope": scope,
        "uid": uid,
        "created_by": USER_UID,
        "updated_by": USER_UID,
        "created_at": TOKEN_CREATED_AT,
        "updated_at": TOKEN_CREATED_AT,
        "description": "",
        "token": token,
        "type": "delivery",
    });
    if let Some(preview) = preview_token {
        value["preview_token"] = json!(preview);
    }
    value
}
