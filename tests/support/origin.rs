//! A fake Contentstack CDA origin for integration tests.
//!
//! It listens on `127.0.0.1:0`, speaks HTTP/1.1 and h2c (prior knowledge), records every request
//! and answers by path:
//!
//! - `/stream?chunks=N&interval_ms=M`: 200, `N` chunks of `{"chunk":i}\n`, one every `M` ms
//!   (defaults 200 and 50); started/completed/aborted streams are counted;
//! - `/slow?ms=M`: 200 `{"slow":true}` after `M` ms;
//! - `/status/{code}`: that status with `{"status":code}`;
//! - `/reset`: the connection is dropped without an answer (h2: the stream is reset);
//! - `/big?bytes=N`: 200 with `N` bytes of `a` in 16 KiB chunks;
//! - anything else: 200 `{"entries":[],"method":..,"path":..,"query":..}` with `x-origin: fake-cda`.
//!
//! Every response carries `x-origin-seen-request-id` with the request's `x-request-id`, if any.
//! Everything stops when the [`Origin`] is dropped.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How long the `wait_for_*` helpers wait before panicking.
const WAIT_DEADLINE: Duration = Duration::from_secs(10);
/// Chunk size of `/big`.
const BIG_CHUNK: usize = 16 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request as the origin saw it (the whole body is collected before answering).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The value of header `name` as a string, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Counters of `/stream` responses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams whose response was produced.
    pub started: usize,
    /// Streams whose every chunk was handed to the connection.
    pub completed: usize,
    /// Streams whose body was dropped (client gone, connection closed) before the last chunk.
    pub aborted: usize,
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    streams: StreamStats,
    /// TCP connections accepted.
    connections: usize,
    /// `/big` bodies dropped before their last byte.
    big_aborted: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every recorded event; waiters subscribe to it.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        {
            let mut state = self.state.lock().unwrap();
            f(&mut state);
        }
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let state = self.state.lock().unwrap();
        f(&state)
    }

    async fn wait_until(&self, what: &str, cond: impl Fn(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        let waited = tokio::time::timeout(WAIT_DEADLINE, async {
            loop {
                if self.read(&cond) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        if waited.is_err() {
            let (requests, streams) = self.read(|s| (s.requests.len(), s.streams));
            panic!(
                "fake origin: timed out after {WAIT_DEADLINE:?} waiting for {what} \
                 (requests so far: {requests}, streams: {streams:?})"
            );
        }
    }
}

/// A running fake CDA origin; stops (listener and connections) when dropped.
pub struct Origin {
    pub addr: SocketAddr,
    /// Serving TLS (`https://localhost:PORT`).
    tls: bool,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Origin {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        match self.tls {
            true => format!("https://localhost:{}", self.addr.port()),
            false => format!("http://{}", self.addr),
        }
    }

    /// Every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.read(|s| s.requests.clone())
    }

    /// The number of requests recorded so far.
    pub fn request_count(&self) -> usize {
        self.shared.read(|s| s.requests.len())
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.read(|s| s.connections)
    }

    /// Waits until at least `n` `/big` bodies were dropped before their
    /// end (their connection closed); panics after 10 s.
    pub async fn wait_for_big_aborted(&self, n: usize) {
        self.shared
            .wait_until(&format!("{n} aborted /big bodies"), |s| s.big_aborted >= n)
            .await;
    }

    /// The last request recorded, if any.
    pub fn last_request(&self) -> Option<Recorded> {
        self.shared.read(|s| s.requests.last().cloned())
    }

    /// Waits until at least `n` requests were recorded; panics after 10 s.
    pub async fn wait_for_requests(&self, n: usize) {
        self.shared
            .wait_until(&format!("{n} request(s)"), |s| s.requests.len() >= n)
            .await;
    }

    /// The `/stream` counters.
    pub fn streams(&self) -> StreamStats {
        self.shared.read(|s| s.streams)
    }

    /// Waits until at least `n` streams were aborted; panics after 10 s.
    pub async fn wait_for_stream_aborted(&self, n: usize) {
        self.shared
            .wait_until(&format!("{n} aborted stream(s)"), |s| {
                s.streams.aborted >= n
            })
            .await;
    }

    /// Waits until at least `n` streams were started; panics after 10 s.
    pub async fn wait_for_streams_started(&self, n: usize) {
        self.shared
            .wait_until(&format!("{n} started stream(s)"), |s| {
                s.streams.started >= n
            })
            .await;
    }

    /// Waits until at least `n` streams were completed; panics after 10 s.
    pub async fn wait_for_streams_completed(&self, n: usize) {
        self.shared
            .wait_until(&format!("{n} completed stream(s)"), |s| {
                s.streams.completed >= n
            })
            .await;
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts a fake origin on `127.0.0.1:0`.
pub async fn spawn_origin() -> Origin {
    spawn(None).await
}

/// Starts a fake origin on `127.0.0.1:0` that serves TLS with `config`
/// (h2 and http/1.1 by the ALPN it sets).
pub async fn spawn_tls_origin(config: Arc<tokio_rustls::rustls::ServerConfig>) -> Origin {
    spawn(Some(tokio_rustls::TlsAcceptor::from(config))).await
}

async fn spawn(tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("fake origin: bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("fake origin: local_addr");
    let (changed, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        changed,
    });
    let cancel = CancellationToken::new();
    let is_tls = tls.is_some();
    tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone(), tls));
    Origin {
        addr,
        tls: is_tls,
        shared,
        cancel,
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
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
        shared.update(|s| s.connections += 1);
        let shared = shared.clone();
        let cancel = cancel.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc_cancel = cancel.clone();
            let svc = service_fn(move |req| handle(shared.clone(), svc_cancel.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = cancel.cancelled() => {}
                    }
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = cancel.cancelled() => {}
                    }
                }
            }
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<OriginBody>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let request_id = parts.headers.get("x-request-id").cloned();
    shared.update(|s| {
        s.requests.push(Recorded {
            method: parts.method.clone(),
            path: path.clone(),
            query: query.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body,
        });
    });

    let q = query.as_deref();
    let mut response = if path == "/stream" {
        let chunks = param(q, "chunks").unwrap_or(200);
        let interval = Duration::from_millis(param(q, "interval_ms").unwrap_or(50));
        stream_response(&shared, &cancel, chunks, interval)
    } else if path == "/slow" {
        let ms = param(q, "ms").unwrap_or(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = cancel.cancelled() => return Err("fake origin shutting down".into()),
        }
        json_response(StatusCode::OK, r#"{"slow":true}"#.to_owned())
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => json_response(status, format!(r#"{{"status":{}}}"#, status.as_u16())),
            None => json_response(
                StatusCode::BAD_REQUEST,
                format!(r#"{{"error":"bad status code","code":{}}}"#, json_str(code)),
            ),
        }
    } else if path == "/reset" {
        // An error from the service makes hyper drop the connection (h2: reset the stream)
        // without writing a response.
        return Err("fake origin: /reset drops the connection".into());
    } else if path == "/big" {
        let bytes = param(q, "bytes").unwrap_or(0);
        let mut response = Response::new(OriginBody::Repeat {
            remaining: bytes,
            shared: Arc::clone(&shared),
        });
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        response
    } else {
        let body = format!(
            r#"{{"entries":[],"method":{},"path":{},"query":{}}}"#,
            json_str(parts.method.as_str()),
            json_str(&path),
            query.as_deref().map_or_else(|| "null".to_owned(), json_str),
        );
        let mut response = json_response(StatusCode::OK, body);
        response
            .headers_mut()
            .insert("x-origin", HeaderValue::from_static("fake-cda"));
        response
    };
    if let Some(id) = request_id {
        response
            .headers_mut()
            .insert("x-origin-seen-request-id", id);
    }
    Ok(response)
}

fn stream_response(
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    chunks: u64,
    interval: Duration,
) -> Response<OriginBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    shared.update(|s| s.streams.started += 1);
    let shared = shared.clone();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tx.closed() => {
                        shared.update(|s| s.streams.aborted += 1);
                        return;
                    }
                    _ = cancel.cancelled() => {
                        shared.update(|s| s.streams.aborted += 1);
                        return;
                    }
                }
            }
            let chunk = Bytes::from(format!("{{\"chunk\":{i}}}\n"));
            if tx.send(chunk).await.is_err() {
                shared.update(|s| s.streams.aborted += 1);
                return;
            }
        }
        shared.update(|s| s.streams.completed += 1);
    });
    let mut response = Response::new(OriginBody::Channel(rx));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_response(status: StatusCode, body: String) -> Response<OriginBody> {
    let mut response = Response::new(OriginBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A numeric query parameter (no percent-decoding needed for numbers).
fn param(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The origin's response bodies.
enum OriginBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
    Repeat { remaining: u64, shared: Arc<Shared> },
}

impl Drop for OriginBody {
    fn drop(&mut self) {
        if let OriginBody::Repeat { remaining, shared } = self {
            if *remaining > 0 {
                shared.update(|s| s.big_aborted += 1);
            }
        }
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            OriginBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OriginBody::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
            OriginBody::Repeat { remaining, .. } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (*remaining).min(BIG_CHUNK as u64);
                *remaining -= n;
                let chunk = Bytes::from(vec![b'a'; n as usize]);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OriginBody::Full(bytes) => bytes.is_none(),
            OriginBody::Channel(_) => false,
            OriginBody::Repeat { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OriginBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            OriginBody::Channel(_) => SizeHint::default(),
            OriginBody::Repeat { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
