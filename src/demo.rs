//! `stackgate demo`: the gateway on loopback with an embedded sample stack
//! (a tokens file) and a small origin that answers like the CDA, plus the
//! curl commands that show each behaviour (SPEC §8). [`cluster`]: the same
//! with several replicas on one local Redis (`--cluster N`, SPEC §10).

pub mod cluster;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::response::{self, Body, BoxError};
use crate::Gateway;

/// The embedded config template.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
/// The embedded tokens file.
pub const DEMO_TOKENS: &str = include_str!("../config/demo-tokens.json");
/// Where the demo listens unless told otherwise (falls back to a free port).
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
/// Where the demo's admin API listens unless told otherwise.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
/// How long the demo origin's `/v3/stream` runs.
pub const STREAM_SECONDS: u64 = 120;

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo files: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Start(#[from] crate::app::StartError),
    #[error("the demo registry did not load: {0}")]
    Registry(String),
    #[error("{0}")]
    Redis(String),
}

/// A started demo: the gateway, its origin, and the files it wrote.
pub struct Demo {
    pub gateway: Gateway,
    pub origin: SocketAddr,
    pub admin_token: String,
    pub dir: PathBuf,
    origin_stop: CancellationToken,
}

/// Starts the origin and the gateway. `http`/`admin` are tried first; if
/// taken, a free port is used instead.
pub async fn start(http: SocketAddr, admin: SocketAddr) -> Result<Demo, DemoError> {
    let dir = std::env::temp_dir().join(format!("stackgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tokens_file = dir.join("tokens.json");
    std::fs::write(&tokens_file, DEMO_TOKENS)?;

    let origin_stop = CancellationToken::new();
    let origin = spawn_origin(origin_stop.clone()).await?;
    let admin_token = format!("{:032x}", rand::random::<u128>());
    let text = DEMO_CONFIG
        .replace("{http}", &free_or_any(http).to_string())
        .replace("{admin}", &free_or_any(admin).to_string())
        .replace("{origin}", &format!("http://{origin}"))
        .replace("{tokens_file}", &tokens_file.display().to_string())
        .replace(
            "{snapshot}",
            &dir.join("snapshot.json").display().to_string(),
        );
    let token = admin_token.clone();
    let config = Config::parse(&text, &move |name| {
        (name == "STACKGATE_DEMO_ADMIN_TOKEN").then(|| token.clone())
    })?;
    let gateway = Gateway::start(config).await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gateway.shared.stacks.iter().any(|s| s.view().is_none()) {
        if tokio::time::Instant::now() > deadline {
            let errors: Vec<String> = gateway
                .shared
                .stacks
                .iter()
                .filter_map(|s| s.status().last_error.map(|e| e.to_string()))
                .collect();
            return Err(DemoError::Registry(errors.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Demo {
        gateway,
        origin,
        admin_token,
        dir,
        origin_stop,
    })
}

fn free_or_any(preferred: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(preferred) {
        Ok(_probe) => preferred,
        Err(_) => SocketAddr::new(preferred.ip(), 0),
    }
}

impl Demo {
    /// The walkthrough printed at start.
    pub fn instructions(&self) -> String {
        let gw = self
            .gateway
            .http_addr
            .map_or_else(String::new, |a| format!("http://{a}"));
        let admin = format!("http://{}", self.gateway.admin_addr);
        let bearer = &self.admin_token;
        let site = "-H 'api_key: blt_demo_stack'";
        let token = "-H 'access_token: cs_demo_website_delivery'";
        let preview = "-H 'preview_token: cs_demo_website_preview'";
        format!(
            r#"stackgate demo is running (Ctrl-C to stop).
  gateway  {gw}
  admin    {admin}   (bearer: {bearer})
  origin   http://{origin}   (a small stand-in for the CDA)
  tokens   {tokens}   (edit it: the registry reloads within a second)

Allowed: a delivery token reading its own environment
  curl -i {site} {token} '{gw}/v3/content_types/blog/entries?environment=production'

Allowed: live preview with the preview token (path prefix /preview)
  curl -i {site} {token} {preview} -H 'live_preview: abc' '{gw}/preview/v3/content_types/blog/entries'

Allowed: GraphQL (path prefix /graphql)
  curl -i -X POST {token} -H 'content-type: application/json' -d '{{"query":"{{ all_blog {{ total }} }}"}}' '{gw}/graphql/stacks/blt_demo_stack?environment=production'

Refused, one per reason (see the x-stackgate-reason header):
  curl -i {site} '{gw}/v3/entries'                                                   # 401 invalid_token
  curl -i {site} -H 'access_token: nope' '{gw}/v3/entries'                           # 401 invalid_token
  curl -i -H 'api_key: blt_other' {token} '{gw}/v3/entries'                          # 412 unknown_stack
  curl -i {site} {token} '{gw}/v3/entries?environment=staging'                       # 403 environment_out_of_scope
  curl -i {site} {token} -H 'branch: feature-x' '{gw}/v3/entries'                    # 422 branch_out_of_scope
  curl -i {site} {preview} '{gw}/v3/entries'                                         # 403 preview_token_on_delivery
  curl -i {site} {token} '{gw}/preview/v3/entries'                                   # 401 invalid_preview_token
  curl -i {site} -H 'access_token: cs_demo_staging_delivery' {preview} '{gw}/preview/v3/entries'   # 401 token_mismatch
  curl -i '{gw}/v3/entries?api_key=blt_demo_stack&access_token=x'                    # 400 credential_in_query
  curl -i {site} {token} -H 'authorization: Bearer x' '{gw}/v3/entries'              # 403 management_credential
  curl -i -X DELETE {site} {token} '{gw}/v3/entries'                                 # 405 method_not_allowed

Revocation ends a live session: start a slow stream in one terminal...
  curl -N {site} {token} '{gw}/v3/stream'
...then revoke the token in another; the stream stops at once:
  curl -X POST -H 'Authorization: Bearer {bearer}' '{admin}/admin/tokens/blt_demo_website/revoke'
Later requests get 401 token_revoked; lift the revocation with:
  curl -X DELETE -H 'Authorization: Bearer {bearer}' '{admin}/admin/tokens/blt_demo_website/revoke'

Operate:
  curl -s '{admin}/metrics' | grep '^stackgate_'
  curl -s -H 'Authorization: Bearer {bearer}' '{admin}/admin/tokens'
  curl -s -H 'Authorization: Bearer {bearer}' '{admin}/admin/stacks'
"#,
            origin = self.origin,
            tokens = self.dir.join("tokens.json").display(),
        )
    }

    /// Runs until a signal, then stops everything and removes the demo files.
    pub async fn run_until_signal(self) {
        let Demo {
            gateway,
            dir,
            origin_stop,
            ..
        } = self;
        gateway.run_until_signal().await;
        origin_stop.cancel();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A stand-in CDA origin on an ephemeral loopback port.
async fn spawn_origin(stop: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                () = stop.cancelled() => return,
            };
            let builder = Arc::clone(&builder);
            let stop = stop.clone();
            tokio::spawn(async move {
                let connection = builder.serve_connection(TokioIo::new(stream), service_fn(origin));
                tokio::select! {
                    _ = connection => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

async fn origin(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let branch = request
        .headers()
        .get("branch")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("main")
        .to_owned();
    if path == "/v3/stream" {
        return Ok(stream());
    }
    let body = if path.starts_with("/stacks/") {
        json!({ "data": { "all_blog": { "total": 1, "items": [{ "title": "Hello from the demo origin" }] } } })
    } else if path.ends_with("/entries") {
        json!({
            "entries": [{ "uid": "blt_entry_1", "title": "Hello from the demo origin", "locale": "en-us" }],
            "origin_saw": { "path": path, "query": query, "branch": branch },
        })
    } else {
        json!({ "notice": "demo origin", "origin_saw": { "path": path, "query": query, "branch": branch } })
    };
    let mut response = Response::new(response::full(body.to_string()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// One JSON line every half second: long enough to revoke it mid-way.
fn stream() -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    tokio::spawn(async move {
        for i in 0..STREAM_SECONDS * 2 {
            let line = format!("{{\"tick\":{i}}}\n");
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
