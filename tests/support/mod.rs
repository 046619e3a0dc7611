//! What integration tests share: the fakes, a gateway on loopback ports, a few
//! HTTP helpers, and a log buffer for leak checks.
#![allow(dead_code)]

pub mod cma;
pub mod origin;
pub mod pki;
pub mod process;
pub mod redis_server;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use stackgate::config::Config;
use stackgate::{Gateway, Shared};
use tokio::net::TcpStream;

/// The admin bearer every test gateway uses.
pub const ADMIN_TOKEN: &str = "test-admin-bearer-5b1e";
/// The CMA credential every test gateway uses.
pub const CMA_SECRET: &str = "cma-authtoken-secret-8c2d";
/// The test stack's api_key.
pub const API_KEY: &str = "blt_test_stack";

/// Token values used across tests; none may ever show up in logs or metrics.
pub const PROD: &str = "cs_prod_delivery_value_1a";
pub const PROD_PREVIEW: &str = "cs_prod_preview_value_2b";
pub const STAGING: &str = "cs_staging_delivery_value_3c";
pub const ALL_VALUES: [&str; 4] = [PROD, PROD_PREVIEW, STAGING, CMA_SECRET];

/// The two standard tokens in the CMA's list shape.
pub fn standard_tokens() -> Vec<serde_json::Value> {
    vec![
        cma::token_json(
            "blt_prod",
            "Production",
            PROD,
            Some(PROD_PREVIEW),
            ("production", "blt_env_prod"),
            Some(&["main", "development"]),
            Some(&["deploy"]),
        ),
        cma::token_json(
            "blt_staging",
            "Staging",
            STAGING,
            None,
            ("staging", "blt_env_staging"),
            None,
            None,
        ),
    ]
}

/// A config with one route per kind (`cdn.test`, `preview.test`,
/// `graphql.test`, `gqlpreview.test`, and `/cda` on `prefixed.test`), all to
/// `origin`, and one stack whose `[stacks.registry]` body is `registry`.
pub fn config(origin: &str, registry: &str) -> String {
    config_with(origin, registry, "")
}

/// [`config`] with extra top-level TOML (`[server]`, `[upstream]`) before the routes.
pub fn config_with(origin: &str, registry: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[admin]
token_env = "STACKGATE_ADMIN_TOKEN"

{extra}

[[routes]]
kind = "delivery"
hosts = ["cdn.test"]
upstream = "{origin}"

[[routes]]
kind = "delivery"
hosts = ["prefixed.test"]
path_prefix = "/cda"
upstream = "{origin}"

[[routes]]
kind = "preview"
hosts = ["preview.test"]
upstream = "{origin}"

[[routes]]
kind = "graphql"
hosts = ["graphql.test"]
upstream = "{origin}"

[[routes]]
kind = "graphql_preview"
hosts = ["gqlpreview.test"]
upstream = "{origin}"

[[stacks]]
name = "website"
api_key = "{API_KEY}"

[stacks.registry]
{registry}
"#
    )
}

/// The registry body for a CMA source at `cma` that syncs only when asked.
pub fn cma_registry(cma: &str, snapshot: Option<&std::path::Path>) -> String {
    let snapshot = snapshot.map_or(String::new(), |p| {
        format!("snapshot = \"{}\"\n", p.display())
    });
    format!(
        "cma_url = \"{cma}\"\nauth = \"authtoken\"\ncredential_env = \"STACKGATE_CMA_AUTHTOKEN\"\nsync_interval = \"1h\"\n{snapshot}"
    )
}

fn env(name: &str) -> Option<String> {
    match name {
        "STACKGATE_ADMIN_TOKEN" => Some(ADMIN_TOKEN.to_owned()),
        "STACKGATE_CMA_AUTHTOKEN" => Some(CMA_SECRET.to_owned()),
        _ => None,
    }
}

/// A gateway running in this test's runtime.
pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
}

/// A gateway in front of a recording origin, its registry synced from a
/// fake CMA: what most end-to-end tests start with.
pub struct World {
    pub gateway: TestGateway,
    pub origin: origin::Origin,
    pub cma: cma::FakeCma,
}

impl World {
    /// Starts the three, the CMA listing `tokens`, with `extra` top-level
    /// TOML (`[server]`, `[upstream]`); returns once the registry is loaded.
    pub async fn start(tokens: Vec<serde_json::Value>, extra: &str) -> World {
        let origin = origin::spawn_origin().await;
        let cma = cma::spawn_cma().await;
        cma.set_tokens(tokens);
        let registry = cma_registry(&cma.url(), None);
        let gateway = spawn_ready(&config_with(&origin.url(), &registry, extra)).await;
        World {
            gateway,
            origin,
            cma,
        }
    }
}

/// Starts a gateway from config text (secrets from [`ADMIN_TOKEN`], [`CMA_SECRET`]).
pub async fn spawn_gateway(text: &str) -> TestGateway {
    capture_logs();
    let config = Config::parse(text, &env).expect("test config");
    let gateway = Gateway::start(config).await.expect("gateway starts");
    TestGateway {
        http: gateway.http_addr.expect("http listener"),
        admin: gateway.admin_addr,
        shared: Arc::clone(&gateway.shared),
        gateway: Some(gateway),
    }
}

/// Starts a gateway and waits until every stack's registry is loaded.
pub async fn spawn_ready(text: &str) -> TestGateway {
    let gateway = spawn_gateway(text).await;
    gateway.wait_ready().await;
    gateway
}

impl TestGateway {
    /// Waits (10 s at most) until every stack's registry has loaded.
    pub async fn wait_ready(&self) {
        wait_until("registry loaded", || {
            self.shared.stacks.iter().all(|s| s.view().is_some())
        })
        .await;
    }

    /// The registry version of the first stack.
    pub fn version(&self) -> u64 {
        self.shared
            .stacks
            .iter()
            .next()
            .and_then(|s| s.view())
            .map_or(0, |v| v.registry.version())
    }

    /// An admin API call with the bearer.
    pub async fn admin(&self, method: &str, path: &str) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(self.admin, request).await
    }

    /// An admin API call without credentials.
    pub async fn admin_plain(&self, method: &str, path: &str) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(self.admin, request).await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.admin_plain("GET", "/metrics").await.text()
    }

    /// Stops the gateway, waiting up to `grace`.
    pub async fn stop(mut self, grace: Duration) -> bool {
        match self.gateway.take() {
            Some(gateway) => gateway.shutdown(grace).await,
            None => true,
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gateway) = &self.gateway {
            gateway.shutdown_token().cancel();
        }
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-stackgate-reason` header, or "".
    pub fn reason(&self) -> &str {
        self.headers
            .get("x-stackgate-reason")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A request builder with `host` set.
/// The entry of token `uid` in a `GET /admin/tokens` answer.
pub fn listed_token(listed: &serde_json::Value, uid: &str) -> serde_json::Value {
    listed["tokens"]
        .as_array()
        .expect("a token list")
        .iter()
        .find(|t| t["uid"] == uid)
        .unwrap_or_else(|| panic!("{uid} is not listed: {listed}"))
        .clone()
}

pub fn request(method: &str, host: &str, uri: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
}

/// A GET on `host` with the test stack's api_key and `headers`.
pub fn get(host: &str, uri: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = request("GET", host, uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

/// An HTTP/1.1 client connection whose driver task ends when it closes.
pub async fn h1(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    (sender, tokio::spawn(connection))
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the whole answer.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("response");
    read(response).await
}

/// Reads a response whole.
pub async fn read(response: http::Response<hyper::body::Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// An h2c (prior knowledge) connection to `addr`.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// An h2c connection whose streams get a 16 KiB window and the connection
/// 8 MiB: a stream whose body is not read stalls on its own window without
/// blocking the others. The receiver fires when the connection ends.
pub async fn h2c_small_stream_window(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = connection.await;
        let _ = closed_tx.send(());
    });
    (sender, closed)
}

/// Reads `body` to its end, adding the data to `taken`; returns the error it
/// ended in (`None` when it ended cleanly). Panics after 10 s.
pub async fn read_to_end_or_error(
    body: &mut hyper::body::Incoming,
    taken: &mut usize,
) -> Option<hyper::Error> {
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => *taken += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(err)) => return Some(err),
                None => return None,
            }
        }
    });
    ended
        .await
        .expect("the body neither ended nor failed within 10 s")
}

/// Reads one HTTP/1.1 response with a `content-length` from a raw
/// connection and returns it as text. `pending` holds what was read beyond
/// the previous response (pipelined answers), and keeps what is read
/// beyond this one. Panics if the connection closes first or nothing whole
/// arrives `within`.
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    pending: &mut Vec<u8>,
    within: Duration,
) -> String {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(head_end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or_else(|| panic!("a content-length: {head}"));
            let end = head_end + 4 + length;
            if pending.len() >= end {
                let response: Vec<u8> = pending.drain(..end).collect();
                return String::from_utf8_lossy(&response).into_owned();
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, read.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no whole response within {within:?}"))
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Reads until the peer closes (FIN or reset) and returns what came before;
/// `None` if the connection is still open after `within`.
pub async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(
    read: &mut R,
    within: Duration,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Polls `condition` every 5 ms until it holds; panics after 10 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Clone)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Sends every log line of this test binary (at trace level for stackgate)
/// to a buffer; returns it.
pub fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    Arc::clone(LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = LogBuffer(Arc::clone(&buffer));
        let _ = tracing_subscriber::fmt()
            .with_env_filter("stackgate=trace,hyper=debug,h2=debug,info")
            .with_ansi(false)
            .event_format(stackgate::logging::TextFormat)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    }))
}

/// Everything logged so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&capture_logs().lock().unwrap()).into_owned()
}

/// A raw TCP "origin": on each connection it reads one request head, writes
/// `reply` as it is, and closes. It counts connections accepted and closed.
pub struct RawOrigin {
    pub addr: SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    pub closed: Arc<std::sync::atomic::AtomicUsize>,
    /// The accept loop; aborting it closes the listener.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a [`RawOrigin`] on `127.0.0.1:0`.
pub async fn raw_origin(reply: &'static [u8]) -> RawOrigin {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (a, c) = (Arc::clone(&accepted), Arc::clone(&closed));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
                drop(stream);
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    RawOrigin {
        addr,
        accepted,
        closed,
        task,
    }
}
