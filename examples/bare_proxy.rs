//! The floor of the request path: a hyper server that forwards every request
//! to one upstream the way stackgate does, with no checks, logs or metrics:
//! requests through the light HTTP/1.1 pool (`stackgate::upstream::h1pool`),
//! h2c ones included, since the upstream is plain http.
//! `benches/load.sh` runs it as the "hyper" target so that stackgate's cost
//! is split into what hyper and tokio cost on this machine and what
//! stackgate adds. With `BARE_POOLED=1` every request takes the pooled
//! client (how stackgate forwarded HTTP/1.1 before the HTTP/1.1 pool).
//! With `BARE_ACCESS_LOG=1` it writes one access line per request to stderr
//! (time, method, path, status), one `write` each, as nginx's `access_log`
//! does: the floor of a proxy doing what nginx does in `benches/load.sh`.
//!
//! Run: `cargo run --release --example bare_proxy -- 127.0.0.1:8080 http://127.0.0.1:8081`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mimalloc::MiMalloc;
use stackgate::upstream::h1pool::{H1Pool, Leased};
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or("127.0.0.1:8080".into()).parse()?;
    let upstream: hyper::Uri = args
        .next()
        .unwrap_or("http://127.0.0.1:8081".into())
        .parse()?;
    // The same runtime as stackgate's: single-threaded when pinned to one CPU.
    let runtime = stackgate::runtime()?;
    runtime.block_on(async move {
        let client = stackgate::upstream::build_client(Duration::from_secs(1), None)?;
        let h1pool = H1Pool::new(stackgate::upstream::connector(
            Duration::from_secs(1),
            None,
            false,
        )?);
        let target = Arc::new(stackgate::route::Upstream {
            scheme: upstream
                .scheme()
                .cloned()
                .unwrap_or(http::uri::Scheme::HTTP),
            authority: upstream
                .authority()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("the upstream needs an authority"))?,
        });
        let pooled_only = std::env::var_os("BARE_POOLED").is_some();
        let access_log = std::env::var_os("BARE_ACCESS_LOG").is_some_and(|v| !v.is_empty());
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let client = client.clone();
            let upstream = upstream.clone();
            let (h1pool, target) = (h1pool.clone(), Arc::clone(&target));
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let client = client.clone();
                    let upstream = upstream.clone();
                    let (h1pool, target) = (h1pool.clone(), Arc::clone(&target));
                    async move {
                        let (mut parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let logged = access_log.then(|| (parts.method.clone(), parts.uri.clone()));
                        let pooled = pooled_only;
                        // An h2c request goes upstream over HTTP/1.1, as stackgate sends it.
                        parts.version = http::Version::HTTP_11;
                        parts.headers.remove(http::header::HOST);
                        if !pooled {
                            let request = Request::from_parts(parts, Full::new(body));
                            let (response, lease) = h1pool.send(&target, request).await?;
                            if let Some((method, uri)) = logged {
                                log_line(&method, &uri, response.status());
                            }
                            let response = response.map(|body| Leased::new(body, Some(lease)));
                            return Ok::<Response<Leased>, anyhow::Error>(response);
                        }
                        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        parts.uri = format!("{upstream}{}", path.trim_start_matches('/'))
                            .parse()
                            .map_err(|err: http::uri::InvalidUri| anyhow::anyhow!(err))?;
                        let response = client
                            .request(Request::from_parts(parts, Full::new(body)))
                            .await?;
                        if let Some((method, uri)) = logged {
                            log_line(&method, &uri, response.status());
                        }
                        Ok(response.map(|body| Leased::new(body, None)))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// One access line, written with one `write` (stderr is unbuffered).
fn log_line(method: &http::Method, uri: &hyper::Uri, status: http::StatusCode) {
    use std::io::Write;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let line = format!(
        "{}.{:06} {method} {uri} {}\n",
        now.as_secs(),
        now.subsec_micros(),
        status.as_u16()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}
