//! The TLS listener (SPEC §2, §5 `[tls]`): h2 and http/1.1 by ALPN, TLS 1.2+,
//! certificates reloaded from disk without dropping a request, a broken new
//! certificate ignored, and `stackgate check` naming a bad `tls.cert`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ProtocolVersion, SupportedProtocolVersion};
use support::pki::{Leaf, Pki};
use support::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How long one connection, handshake or request may take before it counts
/// as a failure.
const STEP: Duration = Duration::from_secs(10);
/// How long a certificate change may take to show (the reloader checks every
/// `TLS_RELOAD_INTERVAL`, 5 s).
const RELOAD_DEADLINE: Duration = Duration::from_secs(15);

/// Writes `contents` to a temporary file beside `path`, then renames it over
/// `path`: a reader sees the old file or the new one, never half of one.
fn replace_file(path: &Path, contents: &str) {
    let temp = path.with_extension("next");
    std::fs::write(&temp, contents).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

// ---------------------------------------------------------------------------
// A gateway with a TLS listener
// ---------------------------------------------------------------------------

struct World {
    _gateway: TestGateway,
    https: SocketAddr,
    origin: origin::Origin,
    _cma: cma::FakeCma,
    pki: Pki,
    cert: PathBuf,
    key: PathBuf,
    _dir: TempDir,
}

/// `[listen]` with `https` beside `http` and `admin`, and `[tls]` pointing at
/// `cert` and `key`.
fn tls_config(origin: &str, registry: &str, cert: &Path, key: &Path) -> String {
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let text = config_with(origin, registry, &tls);
    let admin = "admin = \"127.0.0.1:0\"";
    assert!(text.contains(admin));
    text.replacen(admin, &format!("https = \"127.0.0.1:0\"\n{admin}"), 1)
}

/// A gateway serving certificate `leaf` (from `pki`) on its TLS listener.
async fn world(pki: Pki, leaf: &Leaf) -> World {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("gateway.pem");
    let key = dir.path().join("gateway.key");
    replace_file(&cert, &leaf.cert_pem);
    replace_file(&key, &leaf.key_pem);
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&tls_config(
        &origin.url(),
        &cma_registry(&cma.url(), None),
        &cert,
        &key,
    ))
    .await;
    let https = gateway
        .gateway
        .as_ref()
        .unwrap()
        .https_addr
        .expect("the TLS listener is bound");
    World {
        _gateway: gateway,
        https,
        origin,
        _cma: cma,
        pki,
        cert,
        key,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------
// A TLS client
// ---------------------------------------------------------------------------

const TLS_ANY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// A client config trusting only `ca`, offering `alpn`.
fn client_config(
    ca: &CertificateDer<'static>,
    alpn: &[&str],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` for server name `name`.
async fn connect_as(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<TlsStream, String> {
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let connecting = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    };
    tokio::time::timeout(STEP, connecting)
        .await
        .map_err(|_| "TLS connect timed out".to_owned())?
}

async fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> TlsStream {
    connect_as(addr, config, "localhost").await.unwrap()
}

fn alpn(stream: &TlsStream) -> Option<&[u8]> {
    stream.get_ref().1.alpn_protocol()
}

fn protocol(stream: &TlsStream) -> Option<ProtocolVersion> {
    stream.get_ref().1.protocol_version()
}

/// The end-entity certificate the server presented.
fn peer_cert(stream: &TlsStream) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a peer certificate")[0]
        .clone()
        .into_owned()
}

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;
type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h2_over(stream: TlsStream) -> Result<H2, String> {
    let handshake =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream));
    let (sender, connection) = tokio::time::timeout(STEP, handshake)
        .await
        .map_err(|_| "h2 handshake timed out".to_owned())?
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn h1_over(stream: TlsStream) -> Result<H1, String> {
    let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
    let (sender, connection) = tokio::time::timeout(STEP, handshake)
        .await
        .map_err(|_| "http/1.1 handshake timed out".to_owned())?
        .map_err(|e| format!("http/1.1 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// An HTTP/2 request (authority in the URI).
fn h2_get(path: &str, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut builder = http::Request::builder().uri(format!("https://cdn.test{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

async fn send_h2(sender: &mut H2, request: http::Request<Full<Bytes>>) -> Result<Reply, String> {
    let exchange = async {
        sender.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("h2 request: {e}"))?;
        Ok::<_, String>(read(response).await)
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .map_err(|_| "h2 request timed out".to_owned())?
}

async fn send_h1(sender: &mut H1, request: http::Request<Full<Bytes>>) -> Result<Reply, String> {
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("http/1.1 ready: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("http/1.1 request: {e}"))?;
        Ok::<_, String>(read(response).await)
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .map_err(|_| "http/1.1 request timed out".to_owned())?
}

const SITE: (&str, &str) = ("api_key", API_KEY);
const ALLOWED: [(&str, &str); 2] = [SITE, ("access_token", PROD)];

/// One allowed request on a new http/1.1 TLS connection; the certificate the
/// server presented on it.
async fn one_request(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Result<CertificateDer<'static>, String> {
    let stream = connect_as(addr, config, "localhost").await?;
    let cert = peer_cert(&stream);
    let mut sender = h1_over(stream).await?;
    let reply = send_h1(&mut sender, get("cdn.test", "/v3/entries", &ALLOWED)).await?;
    if reply.status != 200 {
        return Err(format!("status {}: {}", reply.status, reply.text()));
    }
    Ok(cert)
}

/// Opens new connections until one presents `expected`; panics after
/// [`RELOAD_DEADLINE`].
async fn wait_for_cert(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    expected: &CertificateDer<'static>,
    what: &str,
) {
    let deadline = Instant::now() + RELOAD_DEADLINE;
    loop {
        let stream = connect(addr, config).await;
        if peer_cert(&stream) == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {RELOAD_DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// ALPN and protocol versions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn alpn_h2_and_http11_are_both_served_over_tls() {
    let pki = Pki::new();
    let leaf = pki.leaf(1);
    let w = world(pki, &leaf).await;
    let ca = w.pki.ca_der();

    // h2 by ALPN.
    let stream = connect(w.https, &client_config(&ca, &["h2"], TLS_ANY)).await;
    assert_eq!(alpn(&stream), Some(&b"h2"[..]));
    assert_eq!(peer_cert(&stream), leaf.der);
    let mut h2 = h2_over(stream).await.unwrap();
    let reply = send_h2(&mut h2, h2_get("/v3/entries", &ALLOWED))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-origin"], "fake-cda");
    let seen = w.origin.last_request().unwrap();
    assert_eq!(seen.path, "/v3/entries");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("access_token"), Some(PROD));

    // http/1.1 by ALPN.
    let stream = connect(w.https, &client_config(&ca, &["http/1.1"], TLS_ANY)).await;
    assert_eq!(alpn(&stream), Some(&b"http/1.1"[..]));
    let mut h1 = h1_over(stream).await.unwrap();
    let reply = send_h1(
        &mut h1,
        get(
            "cdn.test",
            "/v3/content_types/blog/entries?environment=production",
            &[SITE, ("access_token", PROD), ("x-request-id", "tls-h1-1")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-request-id"], "tls-h1-1");
    let seen = w.origin.last_request().unwrap();
    assert_eq!(seen.path, "/v3/content_types/blog/entries");
    assert_eq!(seen.query.as_deref(), Some("environment=production"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-request-id"), Some("tls-h1-1"));
    assert_eq!(w.origin.request_count(), 2);

    // The IP address SAN works too.
    let stream = connect_as(
        w.https,
        &client_config(&ca, &["http/1.1"], TLS_ANY),
        "127.0.0.1",
    )
    .await
    .unwrap();
    assert_eq!(peer_cert(&stream), leaf.der);
}

#[tokio::test]
async fn refusals_over_tls_have_the_contentstack_shape() {
    let pki = Pki::new();
    let leaf = pki.leaf(1);
    let w = world(pki, &leaf).await;
    let ca = w.pki.ca_der();

    let check = |reply: &Reply, status: u16, code: u64, reason: &str| {
        assert_eq!(reply.status, status, "{reason}: {}", reply.text());
        assert_eq!(reply.reason(), reason);
        assert_eq!(reply.headers["content-type"], "application/json");
        let body = reply.json();
        assert_eq!(body["error_code"], code, "{reason}: {body}");
        assert!(body["error_message"].is_string(), "{body}");
        assert!(body["errors"].is_object(), "{body}");
        for value in ALL_VALUES {
            assert!(!reply.text().contains(value), "a token value in the body");
        }
    };

    let stream = connect(w.https, &client_config(&ca, &["h2"], TLS_ANY)).await;
    let mut h2 = h2_over(stream).await.unwrap();
    let reply = send_h2(&mut h2, h2_get("/v3/entries", &[SITE]))
        .await
        .unwrap();
    check(&reply, 401, 105, "invalid_token");
    let reply = send_h2(
        &mut h2,
        h2_get(
            "/v3/entries",
            &[SITE, ("access_token", STAGING), ("branch", "development")],
        ),
    )
    .await
    .unwrap();
    check(&reply, 422, 901, "branch_out_of_scope");
    assert_eq!(
        reply.json()["error_message"],
        "Access denied. You have insufficient permissions to perform operation on this branch 'development'."
    );

    let stream = connect(w.https, &client_config(&ca, &["http/1.1"], TLS_ANY)).await;
    let mut h1 = h1_over(stream).await.unwrap();
    let reply = send_h1(
        &mut h1,
        get("cdn.test", "/v3/entries", &[("access_token", PROD)]),
    )
    .await
    .unwrap();
    check(&reply, 412, 109, "unknown_stack");
    // The refused connection is still usable for an allowed request.
    let reply = send_h1(&mut h1, get("cdn.test", "/v3/entries", &ALLOWED))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        w.origin.request_count(),
        1,
        "only the allowed request went out"
    );
}

#[tokio::test]
async fn tls12_is_accepted_and_tls13_is_preferred() {
    let pki = Pki::new();
    let leaf = pki.leaf(1);
    let w = world(pki, &leaf).await;
    let ca = w.pki.ca_der();

    for alpn_id in ["h2", "http/1.1"] {
        let stream = connect(w.https, &client_config(&ca, &[alpn_id], TLS12_ONLY)).await;
        assert_eq!(protocol(&stream), Some(ProtocolVersion::TLSv1_2));
        assert_eq!(alpn(&stream), Some(alpn_id.as_bytes()));
        let reply = if alpn_id == "h2" {
            let mut sender = h2_over(stream).await.unwrap();
            send_h2(&mut sender, h2_get("/v3/entries", &ALLOWED))
                .await
                .unwrap()
        } else {
            let mut sender = h1_over(stream).await.unwrap();
            send_h1(&mut sender, get("cdn.test", "/v3/entries", &ALLOWED))
                .await
                .unwrap()
        };
        assert_eq!(reply.status, 200, "TLS 1.2 {alpn_id}: {}", reply.text());
    }

    let stream = connect(w.https, &client_config(&ca, &["h2"], TLS_ANY)).await;
    assert_eq!(protocol(&stream), Some(ProtocolVersion::TLSv1_3));

    // A TLS 1.1 ClientHello (no supported_versions extension) is refused with
    // a protocol_version alert, not answered with a ServerHello.
    let answer = raw_client_hello(w.https, [0x03, 0x02]).await;
    assert!(
        answer.len() >= 7 && answer[0] == 0x15 && answer[5] == 2 && answer[6] == 70,
        "expected a fatal protocol_version alert, got {answer:02x?}"
    );
}

/// Sends a minimal ClientHello with `version` as its only offered version;
/// returns what the server wrote before closing.
async fn raw_client_hello(addr: SocketAddr, version: [u8; 2]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
                  // TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0xc0, 0x09]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
                                           // signature_algorithms (which rustls wants before it looks at the
                                           // version): ecdsa_secp256r1_sha256, rsa_pkcs1_sha256. No
                                           // supported_versions: the legacy version field is all there is.
    body.extend_from_slice(&[
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01,
    ]);
    let len = body.len();
    let mut handshake = vec![0x01, 0, (len >> 8) as u8, len as u8];
    handshake.extend_from_slice(&body);
    let len = handshake.len();
    let mut record = vec![0x16, 0x03, 0x01, (len >> 8) as u8, len as u8];
    record.extend_from_slice(&handshake);

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept a TLS 1.1 handshake open");
    answer
}

// ---------------------------------------------------------------------------
// Certificate reload
// ---------------------------------------------------------------------------

/// New connections and requests every ~50 ms until stopped, recording every
/// failure and every certificate seen.
struct Prober {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<ProbeLog>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProbeLog {
    ok: usize,
    failures: Vec<String>,
    certs: Vec<CertificateDer<'static>>,
}

impl Prober {
    fn start(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(ProbeLog::default()));
        let task = tokio::spawn({
            let (stop, log) = (Arc::clone(&stop), Arc::clone(&log));
            async move {
                while !stop.load(Ordering::Acquire) {
                    let result = one_request(addr, &config).await;
                    {
                        let mut log = log.lock().unwrap();
                        match result {
                            Ok(cert) => {
                                log.ok += 1;
                                if log.certs.last() != Some(&cert) {
                                    log.certs.push(cert);
                                }
                            }
                            Err(err) => log.failures.push(err),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Prober { stop, log, task }
    }

    fn ok(&self) -> usize {
        self.log.lock().unwrap().ok
    }

    fn seen(&self, cert: &CertificateDer<'static>) -> bool {
        self.log.lock().unwrap().certs.contains(cert)
    }

    async fn finish(self) -> ProbeLog {
        self.stop.store(true, Ordering::Release);
        tokio::time::timeout(STEP * 2, self.task)
            .await
            .expect("the prober stops")
            .unwrap();
        Arc::try_unwrap(self.log)
            .ok()
            .expect("the prober is gone")
            .into_inner()
            .unwrap()
    }
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_without_dropping_requests() {
    let pki = Pki::new();
    let a = pki.leaf(0xA1);
    let w = world(pki, &a).await;
    let b = w.pki.leaf(0xB2);
    assert_ne!(a.der, b.der);
    let ca = w.pki.ca_der();

    // An HTTP/2 connection opened before the swap.
    let early = connect(w.https, &client_config(&ca, &["h2"], TLS_ANY)).await;
    assert_eq!(peer_cert(&early), a.der);
    let mut early = h2_over(early).await.unwrap();
    let reply = send_h2(&mut early, h2_get("/v3/entries", &ALLOWED))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    let prober = Prober::start(w.https, client_config(&ca, &["http/1.1"], TLS_ANY));
    wait_until("the prober's first requests", || prober.ok() >= 2).await;
    assert!(prober.seen(&a.der));

    // B replaces A: certificate first, then key, each renamed into place.
    replace_file(&w.cert, &b.cert_pem);
    replace_file(&w.key, &b.key_pem);
    let fresh = client_config(&ca, &["http/1.1"], TLS_ANY);
    wait_for_cert(w.https, &fresh, &b.der, "the new certificate").await;
    // New connections keep presenting B.
    for _ in 0..3 {
        assert_eq!(peer_cert(&connect(w.https, &fresh).await), b.der);
    }
    let after = prober.ok();
    wait_until("the prober's requests after the swap", || {
        prober.ok() >= after + 2 && prober.seen(&b.der)
    })
    .await;

    let log = prober.finish().await;
    assert!(
        log.failures.is_empty(),
        "requests failed during the swap ({} ok): {:?}",
        log.ok,
        log.failures
    );
    assert_eq!(
        log.certs,
        vec![a.der.clone(), b.der.clone()],
        "the prober saw A, then only B"
    );

    // The connection opened before the swap still works.
    let reply = send_h2(&mut early, h2_get("/v3/entries?after=swap", &ALLOWED))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        w.origin.last_request().unwrap().query.as_deref(),
        Some("after=swap")
    );
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_previous_certificate() {
    let pki = Pki::new();
    let a = pki.leaf(0xA1);
    let w = world(pki, &a).await;
    let ca = w.pki.ca_der();
    let config = client_config(&ca, &["http/1.1"], TLS_ANY);
    let refusals = || reload_refusals(&w.cert);
    assert_eq!(refusals(), 0);

    // Garbage where the certificate was.
    replace_file(
        &w.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    // Wait until the reloader has looked at it (and refused it) twice, so
    // at least one full reload interval has passed since it changed.
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while refusals() < 2 {
        assert!(
            Instant::now() < deadline,
            "the reloader never reported the broken certificate; logs:\n{}",
            logs()
        );
        // A new connection meanwhile still gets A and a 200.
        assert_eq!(one_request(w.https, &config).await.unwrap(), a.der);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(one_request(w.https, &config).await.unwrap(), a.der);

    // A good pair afterwards is picked up.
    let c = w.pki.leaf(0xC3);
    replace_file(&w.key, &c.key_pem);
    replace_file(&w.cert, &c.cert_pem);
    wait_for_cert(w.https, &config, &c.der, "the repaired certificate").await;
    assert_eq!(one_request(w.https, &config).await.unwrap(), c.der);
}

/// Log lines in which the reloader refused the files beside `cert` (each
/// test has its own directory).
fn reload_refusals(cert: &Path) -> usize {
    let dir = cert.parent().unwrap().display().to_string();
    logs()
        .lines()
        .filter(|l| l.contains("TLS certificate not reloaded") && l.contains(&dir))
        .count()
}

#[tokio::test]
async fn a_new_certificate_without_its_new_key_keeps_the_old_pair() {
    let pki = Pki::new();
    let a = pki.leaf(0xA1);
    let w = world(pki, &a).await;
    let b = w.pki.leaf(0xB2);
    let config = client_config(&w.pki.ca_der(), &["http/1.1"], TLS_ANY);

    // Only the certificate changes: B's certificate with A's key is not a
    // pair, so A stays until B's key arrives.
    replace_file(&w.cert, &b.cert_pem);
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while reload_refusals(&w.cert) == 0 {
        assert!(
            Instant::now() < deadline,
            "the reloader never reported the mismatched pair; logs:\n{}",
            logs()
        );
        assert_eq!(one_request(w.https, &config).await.unwrap(), a.der);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(one_request(w.https, &config).await.unwrap(), a.der);

    replace_file(&w.key, &b.key_pem);
    wait_for_cert(w.https, &config, &b.der, "the completed pair").await;
    assert_eq!(one_request(w.https, &config).await.unwrap(), b.der);
}

// ---------------------------------------------------------------------------
// stackgate check
// ---------------------------------------------------------------------------

/// `stackgate check` on `text`: (success, stdout, stderr).
fn check(dir: &Path, text: &str) -> (bool, String, String) {
    let path = dir.join("stackgate.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stackgate"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("STACKGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("STACKGATE_CMA_AUTHTOKEN", CMA_SECRET)
        .env_remove("RUST_LOG")
        .output()
        .expect("stackgate runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_names_a_missing_or_broken_tls_cert() {
    let pki = Pki::new();
    let leaf = pki.leaf(1);
    let other = pki.leaf(2);
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("gateway.pem");
    let key = dir.path().join("gateway.key");
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let unused = "http://127.0.0.1:9";
    let text = tls_config(unused, &cma_registry(unused, None), &cert, &key);

    let (ok, stdout, stderr) = check(dir.path(), &text);
    assert!(ok, "a good [tls] failed check: {stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");

    let refused = |text: &str, key_name: &str, what: &str| {
        let (ok, stdout, stderr) = check(dir.path(), text);
        assert!(!ok, "check passed {what}; stdout: {stdout}");
        assert!(
            stderr.contains(key_name),
            "check did not name {key_name} for {what}: {stderr}"
        );
        for secret in ALL_VALUES.iter().chain([&ADMIN_TOKEN]) {
            assert!(!stderr.contains(secret), "{secret:?} leaked: {stderr}");
        }
    };

    let missing = dir.path().join("missing.pem");
    refused(
        &tls_config(unused, &cma_registry(unused, None), &missing, &key),
        "tls.cert",
        "a missing certificate file",
    );

    let cases = [
        ("plain garbage", "this is not a certificate\n".to_owned()),
        (
            "garbage inside PEM armour",
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n"
                .to_owned(),
        ),
        (
            "a PEM block that is not DER",
            "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSBnYXJiYWdlIGdhcmJhZ2U=\n-----END CERTIFICATE-----\n"
                .to_owned(),
        ),
        ("an empty file", String::new()),
        ("a key where the certificate belongs", leaf.key_pem.clone()),
    ];
    for (what, contents) in cases {
        std::fs::write(&cert, contents).unwrap();
        refused(&text, "tls.cert", what);
    }

    // A certificate that does not match the key names the pair.
    std::fs::write(&cert, &other.cert_pem).unwrap();
    let (ok, stdout, stderr) = check(dir.path(), &text);
    assert!(
        !ok,
        "check passed a certificate and key that do not match; stdout: {stdout}"
    );
    assert!(
        stderr.contains("tls.cert") || stderr.contains("tls.key"),
        "check did not name tls.cert or tls.key for a mismatched pair: {stderr}"
    );

    // A broken key names tls.key.
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    refused(&text, "tls.key", "a broken key");
}
