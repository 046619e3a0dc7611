//! The floor of the request path: a hyper server that forwards every request
//! to one upstream through the same pooled client stackgate uses, with no
//! checks, logs or metrics. `benches/load.sh` runs it as the "hyper" target
//! so that stackgate's cost is split into what hyper and tokio cost on this
//! machine and what stackgate adds.
//!
//! Run: `cargo run --release --example bare_proxy -- 127.0.0.1:8080 http://127.0.0.1:8081`

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mimalloc::MiMalloc;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = stackgate::upstream::build_client(Duration::from_secs(1), None)?;
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let client = client.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let client = client.clone();
                    let upstream = upstream.clone();
                    async move {
                        let (mut parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        // An h2c request goes upstream over HTTP/1.1, as stackgate sends it.
                        parts.version = http::Version::HTTP_11;
                        parts.headers.remove(http::header::HOST);
                        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        parts.uri = format!("{upstream}{}", path.trim_start_matches('/'))
                            .parse()
                            .map_err(|err: http::uri::InvalidUri| anyhow::anyhow!(err))?;
                        let response = client
                            .request(Request::from_parts(parts, Full::new(body)))
                            .await?;
                        Ok::<Response<Incoming>, anyhow::Error>(response)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
