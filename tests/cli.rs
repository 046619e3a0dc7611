//! The `stackgate` binary as an operator or an acceptance test drives it
//! (SPEC §5, §7, §8, §9): `check` on good and bad config files, `run` with
//! JSON and text logs and a SIGTERM drain, and `demo` through the curl
//! commands it prints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::origin::{spawn_origin, Origin};
use support::{
    config_with, get, send, standard_tokens, Reply, ADMIN_TOKEN, ALL_VALUES, API_KEY, CMA_SECRET,
    PROD, STAGING,
};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_stackgate");
/// How long any awaited event may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);
/// `[server] grace_period` of the `run` tests.
const GRACE: Duration = Duration::from_secs(5);
const SITE: (&str, &str) = ("api_key", API_KEY);
/// A credential no registry lists; presented, it must not be logged either.
const UNKNOWN: &str = "cs_unknown_value_4e9a";

// ---------------------------------------------------------------------------
// stackgate check
// ---------------------------------------------------------------------------

/// A throwaway private CA certificate (no key kept) for `upstream.ca_file`.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjzCCATWgAwIBAgIUVWEiILP6fx73vLEOXM7LhmsTxT4wCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRc3RhY2tnYXRlIHRlc3QgQ0EwIBcNMjYxMTIzMDUyNDQ3WhgP
MjEyNjEwMzAwNTI0NDdaMBwxGjAYBgNVBAMMEXN0YWNrZ2F0ZSB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE3bzHXAF1x9JzmmIe2CQpYsRCs9FmLrdE
sQ9yc6EMWDGP5ua2BvvN9AdbecV+L7snUQRA2AvJej1pIC8nVqG7QaNTMFEwHQYD
VR0OBBYEFErWRQwAhfwz++QG0i281s0ZyQKcMB8GA1UdIwQYMBaAFErWRQwAhfwz
++QG0i281s0ZyQKcMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIh
APf/BHv4WaIOdUDe5Hx+VKO7OgvpGsw08K2kN9SrxGWIAiBQz9Di+0xDdepQ4GIF
JmWaldALT8c17rCoXXxkod2mPw==
-----END CERTIFICATE-----
";

/// Every key of SPEC §5 but `[tls]` and `listen.https`; `{dir}` is the
/// directory the CA, tokens and snapshot files live in.
const FULL: &str = r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[admin]
token_env = "STACKGATE_ADMIN_TOKEN"

[server]
header_timeout = "10s"
idle_timeout = "60s"
max_connections = 10000
max_body_bytes = 1048576
grace_period = "30s"
send_timeout = "60s"

[upstream]
connect_timeout = "2s"
request_timeout = "30s"
max_connections = 1024
ca_file = "{dir}/private-ca.pem"

[[routes]]
kind = "delivery"
hosts = ["cdn.example.com", "*"]
path_prefix = "/cda"
upstream = "https://cdn.contentstack.io"
region = "na"

[[routes]]
kind = "preview"
hosts = ["preview.example.com"]
region = "eu"

[[routes]]
kind = "graphql"
hosts = ["graphql.example.com"]
region = "azure-na"

[[routes]]
kind = "graphql_preview"
hosts = ["graphql-preview.example.com"]
region = "gcp-eu"

[[stacks]]
name = "website"
api_key = "blt0123456789abcdef"

[stacks.registry]
cma_url = "https://api.contentstack.io"
auth = "authtoken"
credential_env = "STACKGATE_CMA_AUTHTOKEN"
sync_interval = "10s"
snapshot = "{dir}/website.json"
max_removal_ratio = 0.5
max_staleness = "6h"

[stacks.limits]
per_token = { rate = 200, burst = 400 }
origin = { rate = 80, burst = 160 }
failed_auth_per_ip = { rate = 5, burst = 20 }

[[stacks.limits.overrides]]
token = "blt_heavy"
rate = 1000
burst = 2000

[[stacks]]
name = "docs"
api_key = "blt_docs_stack"

[stacks.registry]
cma_url = "https://eu-api.contentstack.com"
auth = "bearer"
credential_env = "STACKGATE_CMA_AUTHTOKEN"

[[stacks]]
name = "files"
api_key = "blt_files_stack"

[stacks.registry]
tokens_file = "{dir}/tokens.json"
max_staleness = "0"
"#;

/// What a finished `stackgate check` left behind.
struct Checked {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// `stackgate` with both standard secrets set (minus `unset`) and no `RUST_LOG`.
fn stackgate(unset: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("STACKGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("STACKGATE_CMA_AUTHTOKEN", CMA_SECRET)
        .env_remove("RUST_LOG");
    for name in unset {
        command.env_remove(name);
    }
    command
}

fn finish(mut command: Command) -> Checked {
    let output = command.output().expect("stackgate runs");
    Checked {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A temp dir holding the CA file; the [`FULL`] config pointing into it.
fn full_config() -> (TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("private-ca.pem"), TEST_CA).unwrap();
    let text = FULL.replace("{dir}", &dir.path().display().to_string());
    (dir, text)
}

/// `text` with the first `from` replaced by `to` (which must be there).
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the config has no {from:?}");
    text.replacen(from, to, 1)
}

/// `stackgate check --config <file with text>`, without the variables in `unset`.
fn check(text: &str, unset: &[&str]) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stackgate.toml");
    std::fs::write(&path, text).unwrap();
    let mut command = stackgate(unset);
    command.arg("check").arg("--config").arg(&path);
    finish(command)
}

/// Asserts a non-zero exit whose stderr holds every one of `names`, and no secret.
fn assert_refused(checked: &Checked, names: &[&str]) {
    assert!(
        !checked.status.success(),
        "check passed a bad config; stdout: {}",
        checked.stdout
    );
    for name in names {
        assert!(
            checked.stderr.contains(name),
            "stderr does not name {name:?}: {}",
            checked.stderr
        );
    }
    assert_no_secrets(&checked.stderr);
    assert!(
        !checked.stdout.contains(": ok"),
        "a failed check printed ok: {}",
        checked.stdout
    );
}

fn assert_no_secrets(text: &str) {
    for secret in ALL_VALUES.iter().chain([&ADMIN_TOKEN, &UNKNOWN]) {
        assert!(!text.contains(secret), "{secret:?} leaked into: {text}");
    }
}

#[test]
fn check_accepts_a_config_with_every_key() {
    let (_dir, text) = full_config();
    let checked = check(&text, &[]);
    assert!(checked.status.success(), "stderr: {}", checked.stderr);
    assert!(
        checked
            .stdout
            .contains("stackgate.toml: ok (4 routes, 3 stacks)"),
        "stdout: {}",
        checked.stdout
    );
    // [admin] is set: the two stacks without a snapshot are warned about
    // (admin revocations of theirs would live only in memory).
    for (stack, warned) in [(0, false), (1, true), (2, true)] {
        let line = format!("warning: stacks[{stack}].registry.snapshot: not set");
        assert_eq!(
            checked.stderr.contains(&line),
            warned,
            "stacks[{stack}]: {}",
            checked.stderr
        );
    }
    assert_no_secrets(&checked.stdout);
    assert_no_secrets(&checked.stderr);
}

#[test]
fn check_takes_the_global_log_format_flag_after_the_subcommand() {
    let (dir, text) = full_config();
    let path = dir.path().join("stackgate.toml");
    std::fs::write(&path, text).unwrap();
    let mut command = stackgate(&[]);
    command
        .args(["check", "--log-format", "json", "--config"])
        .arg(&path);
    let checked = finish(command);
    assert!(checked.status.success(), "stderr: {}", checked.stderr);
}

#[test]
fn check_names_a_bad_duration() {
    let (_dir, text) = full_config();
    let text = edit(
        &text,
        r#"sync_interval = "10s""#,
        r#"sync_interval = "10 parsecs""#,
    );
    assert_refused(
        &check(&text, &[]),
        &["stacks[0].registry.sync_interval", "10 parsecs"],
    );
}

#[test]
fn check_names_an_unknown_key() {
    let (_dir, text) = full_config();
    let top = edit(
        &text,
        "grace_period = \"30s\"",
        "grace_period = \"30s\"\ndrain_period = \"5s\"",
    );
    assert_refused(&check(&top, &[]), &["drain_period"]);
    let nested = edit(
        &text,
        "max_removal_ratio = 0.5",
        "max_removal_ratio = 0.5\nmax_removals = 3",
    );
    assert_refused(&check(&nested, &[]), &["max_removals"]);
}

#[test]
fn check_names_a_missing_credential_variable() {
    let (_dir, text) = full_config();
    assert_refused(
        &check(&text, &["STACKGATE_CMA_AUTHTOKEN"]),
        &[
            "stacks[0].registry.credential_env",
            "STACKGATE_CMA_AUTHTOKEN",
        ],
    );
}

#[test]
fn check_names_a_missing_admin_token_variable() {
    let (_dir, text) = full_config();
    assert_refused(
        &check(&text, &["STACKGATE_ADMIN_TOKEN"]),
        &["admin.token_env", "STACKGATE_ADMIN_TOKEN"],
    );
}

#[test]
fn check_wants_exactly_one_of_cma_url_and_tokens_file() {
    let (_dir, text) = full_config();
    let cma_url = r#"cma_url = "https://api.contentstack.io""#;
    let both = edit(
        &text,
        cma_url,
        &format!("{cma_url}\ntokens_file = \"tokens.json\""),
    );
    assert_refused(
        &check(&both, &[]),
        &["stacks[0].registry", "cma_url", "tokens_file"],
    );
    let neither = edit(&text, cma_url, "");
    assert_refused(
        &check(&neither, &[]),
        &["stacks[0].registry", "cma_url", "tokens_file"],
    );
}

#[test]
fn check_names_an_unknown_route_kind() {
    let (_dir, text) = full_config();
    let text = edit(&text, r#"kind = "delivery""#, r#"kind = "management""#);
    assert_refused(&check(&text, &[]), &["routes[0].kind", "management"]);
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    for subcommand in ["check", "run"] {
        let mut command = stackgate(&[]);
        command.arg(subcommand).arg("--config").arg(&path);
        let checked = finish(command);
        assert!(
            !checked.status.success(),
            "{subcommand} with no file passed"
        );
        assert!(
            checked.stderr.contains(&path.display().to_string()),
            "{subcommand}: stderr does not name the path: {}",
            checked.stderr
        );
    }
}

#[test]
fn check_defaults_to_config_stackgate_toml() {
    let (dir, text) = full_config();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/stackgate.toml"), text).unwrap();
    let mut command = stackgate(&[]);
    command.arg("check").current_dir(dir.path());
    let checked = finish(command);
    assert!(checked.status.success(), "stderr: {}", checked.stderr);
    assert!(
        checked.stdout.contains("config/stackgate.toml: ok"),
        "stdout: {}",
        checked.stdout
    );
}

#[test]
fn the_shipped_config_passes_check() {
    for args in [
        &["check", "--config", "config/stackgate.toml"][..],
        &["check"],
    ] {
        let mut command = stackgate(&[]);
        command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
        let checked = finish(command);
        assert!(
            checked.status.success(),
            "{args:?}: stderr: {}",
            checked.stderr
        );
        assert!(
            checked.stdout.contains("config/stackgate.toml: ok"),
            "{args:?}: stdout: {}",
            checked.stdout
        );
    }
}

// ---------------------------------------------------------------------------
// A child process and its output
// ---------------------------------------------------------------------------

/// Lines of a child's stdout or stderr, read on a thread.
struct Lines {
    rx: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn read(from: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The first line (seen before or arriving now) that `matches`.
    async fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!("output ended before {what}:\n{}", self.seen.join("\n")),
                Err(_) => panic!("timed out waiting for {what}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line up to the end of the output (the process must be exiting).
    async fn until_end(&mut self) -> &[String] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => return &self.seen,
                Err(_) => panic!("output did not end:\n{}", self.seen.join("\n")),
            }
        }
    }
}

/// A running `stackgate`. If it is still running when dropped (a test
/// failed), it gets SIGTERM, so that it can clean up, then SIGKILL.
struct Proc {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

impl Proc {
    fn spawn(mut command: Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("stackgate starts");
        let stdout = Lines::read(child.stdout.take().unwrap());
        let stderr = Lines::read(child.stderr.take().unwrap());
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    /// Sends `signal` ("TERM", "INT") with kill(1).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits until the process exits; fails if it is still running at `deadline`.
    async fn exit_by(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "stackgate still running; stderr:\n{}",
                self.stderr.seen.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of a JSON log line, at the top level (flattened) or under `fields`.
fn field<'a>(line: &'a Value, name: &str) -> &'a Value {
    line.get(name)
        .or_else(|| line.get("fields").and_then(|f| f.get(name)))
        .unwrap_or(&Value::Null)
}

/// The value of `name=` in a text log line, quotes removed.
fn text_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let value = line[start..].split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// The address of `listener` if `line` is its `listening` line (JSON or text).
fn listening_addr(line: &str, listener: &str) -> Option<SocketAddr> {
    match serde_json::from_str::<Value>(line) {
        Ok(json) => {
            let is_it =
                field(&json, "message") == "listening" && field(&json, "listener") == listener;
            is_it.then(|| field(&json, "addr").as_str()?.parse().ok())?
        }
        Err(_) => {
            let is_it =
                line.contains(" listening") && text_field(line, "listener") == Some(listener);
            is_it.then(|| text_field(line, "addr")?.parse().ok())?
        }
    }
}

// ---------------------------------------------------------------------------
// stackgate run
// ---------------------------------------------------------------------------

/// `stackgate run` on loopback ports, in front of a fake origin, with the
/// standard tokens in a tokens file and a 5 s grace period.
struct Gateway {
    proc: Proc,
    http: SocketAddr,
    admin: SocketAddr,
    _dir: TempDir,
}

async fn run_gateway(origin: &Origin, log_args: &[&str]) -> Gateway {
    run_gateway_with(origin, log_args, |_| {}).await
}

/// [`run_gateway`], with `configure` applied to the command before it starts.
async fn run_gateway_with(
    origin: &Origin,
    log_args: &[&str],
    configure: impl FnOnce(&mut Command),
) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let list = serde_json::json!({ "tokens": standard_tokens() });
    std::fs::write(&tokens, list.to_string()).unwrap();
    let registry = format!("tokens_file = \"{}\"", tokens.display());
    let server = format!("[server]\ngrace_period = \"{}s\"", GRACE.as_secs());
    let config = dir.path().join("stackgate.toml");
    std::fs::write(&config, config_with(&origin.url(), &registry, &server)).unwrap();

    let mut command = stackgate(&[]);
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(log_args)
        .current_dir(dir.path());
    configure(&mut command);
    let mut proc = Proc::spawn(command);
    let http = listening(&mut proc.stderr, "http").await;
    let admin = listening(&mut proc.stderr, "admin").await;
    wait_ready(admin).await;
    Gateway {
        proc,
        http,
        admin,
        _dir: dir,
    }
}

/// The address from the `listening` line of `listener`.
async fn listening(stderr: &mut Lines, listener: &str) -> SocketAddr {
    let what = format!("the {listener} listening line");
    let line = stderr
        .wait_for(&what, |l| listening_addr(l, listener).is_some())
        .await;
    listening_addr(&line, listener).unwrap()
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = send(admin, get("admin", "/readyz", &[])).await;
        if reply.status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn request_id(reply: &Reply) -> String {
    reply.headers["x-request-id"].to_str().unwrap().to_owned()
}

/// The JSON access line of the request `id`.
async fn json_access_line(stderr: &mut Lines, id: &str) -> Value {
    let line = stderr
        .wait_for(&format!("the access line of {id}"), |l| {
            l.contains("stackgate::access") && l.contains(id)
        })
        .await;
    let json: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(field(&json, "target"), "stackgate::access", "{line}");
    assert_eq!(field(&json, "request_id"), id, "{line}");
    assert_eq!(field(&json, "stack"), "website", "{line}");
    assert_eq!(field(&json, "route"), "delivery", "{line}");
    assert!(
        field(&json, "duration_ms")
            .as_f64()
            .is_some_and(|d| d >= 0.0),
        "no duration_ms: {line}"
    );
    json
}

/// A delivery GET of `/v3/entries` on the website stack with `token`.
fn entries(token: &str) -> Request<Full<Bytes>> {
    get("cdn.test", "/v3/entries", &[SITE, ("access_token", token)])
}

/// SIGTERM with a slow request in flight: the request completes, then the
/// process exits 0 within the grace period. Returns the slow request's id.
async fn drain_with_a_slow_request(gw: &mut Gateway, origin: &Origin) -> String {
    let before = origin.request_count();
    let slow = tokio::spawn(send(
        gw.http,
        get("cdn.test", "/slow?ms=800", &[SITE, ("access_token", PROD)]),
    ));
    origin.wait_for_requests(before + 1).await;
    let signalled = Instant::now();
    gw.proc.signal("TERM");
    let slow = slow
        .await
        .expect("the request in flight at SIGTERM completes");
    assert_eq!(slow.status, 200, "{}", slow.text());
    assert_eq!(slow.text(), r#"{"slow":true}"#);
    let status = gw.proc.exit_by(signalled + GRACE).await;
    assert!(status.success(), "exit status {status}");
    request_id(&slow)
}

#[tokio::test]
async fn run_logs_json_access_lines_and_drains_on_sigterm() {
    let origin = spawn_origin().await;
    let mut gw = run_gateway(&origin, &["--log-format", "json"]).await;

    let allowed = send(gw.http, entries(PROD)).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let unknown = send(gw.http, entries(UNKNOWN)).await;
    assert_eq!(
        (unknown.status.as_u16(), unknown.reason()),
        (401, "invalid_token")
    );
    let branch = send(
        gw.http,
        get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", PROD), ("branch", "feature-x")],
        ),
    )
    .await;
    assert_eq!(
        (branch.status.as_u16(), branch.reason()),
        (422, "branch_out_of_scope")
    );
    assert_eq!(origin.request_count(), 1, "refusals are not forwarded");
    let tokens = send(
        gw.admin,
        get(
            "admin",
            "/admin/tokens",
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        ),
    )
    .await;
    assert_eq!(tokens.status, 200);
    assert_no_secrets(&tokens.text());

    let line = json_access_line(&mut gw.proc.stderr, &request_id(&allowed)).await;
    assert_eq!(field(&line, "token"), "blt_prod", "{line}");
    assert_eq!(field(&line, "status"), 200, "{line}");
    assert!(field(&line, "reason").is_null(), "{line}");
    let line = json_access_line(&mut gw.proc.stderr, &request_id(&unknown)).await;
    assert_eq!(field(&line, "status"), 401, "{line}");
    assert_eq!(field(&line, "reason"), "invalid_token", "{line}");
    let line = json_access_line(&mut gw.proc.stderr, &request_id(&branch)).await;
    assert_eq!(field(&line, "token"), "blt_prod", "{line}");
    assert_eq!(field(&line, "status"), 422, "{line}");
    assert_eq!(field(&line, "reason"), "branch_out_of_scope", "{line}");

    let slow = drain_with_a_slow_request(&mut gw, &origin).await;

    let lines = gw.proc.stderr.until_end().await;
    // Its access line was one of the last: access lines wait for a batch,
    // and what waits is written before the process ends.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("stackgate::access") && l.contains(&slow)),
        "the last access line was lost: {lines:#?}"
    );
    for line in lines {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}"
        );
        assert_no_secrets(line);
    }
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("grace period over")),
        "the drain did not finish in time: {lines:#?}"
    );
}

#[tokio::test]
async fn run_logs_text_access_lines_by_default() {
    let origin = spawn_origin().await;
    let mut gw = run_gateway(&origin, &[]).await;
    let reply = send(gw.http, entries(PROD)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let refused = send(
        gw.http,
        get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", STAGING), ("branch", "x")],
        ),
    )
    .await;
    assert_eq!(refused.status, 422);

    let id = request_id(&reply);
    let line = gw
        .proc
        .stderr
        .wait_for("the access line", |l| {
            l.contains(&format!("request_id={id}"))
        })
        .await;
    assert!(line.contains("stackgate::access"), "{line}");
    assert!(line.contains("token=blt_prod"), "{line}");
    assert!(line.contains("stack=website"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("route="), "{line}");
    assert!(line.contains("duration_ms="), "{line}");
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "not text: {line}"
    );

    gw.proc.signal("TERM");
    let status = gw.proc.exit_by(Instant::now() + GRACE).await;
    assert!(status.success(), "exit status {status}");
    for line in gw.proc.stderr.until_end().await {
        assert_no_secrets(line);
    }
}

/// Restricts the command's process to one CPU, the first it may use now,
/// as `taskset -c N` or a one-core cgroup quota would.
fn confine_to_one_cpu(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `cpu_set_t` is plain data; zeroed is an empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `allowed` is a valid, writable set of `size` bytes.
    let got = unsafe { libc::sched_getaffinity(0, size, &mut allowed) };
    assert_eq!(got, 0, "sched_getaffinity failed");
    let first = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below `CPU_SETSIZE`, the set's capacity.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .unwrap();
    // SAFETY: as for `allowed`; `first` is below `CPU_SETSIZE`.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(first, &mut one) };
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, size, &one) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// On one CPU the binary runs tokio's single-threaded scheduler (README,
/// "Threads"). Everything must still work there: loading the tokens file
/// (a blocking task), forwarding, refusing, the admin API, draining on
/// SIGTERM with a request in flight. Code that only works on the
/// work-stealing scheduler (`block_in_place`, a busy wait on another task)
/// fails here.
#[tokio::test]
async fn run_confined_to_one_cpu_serves_refuses_and_drains() {
    let origin = spawn_origin().await;
    let mut gw = run_gateway_with(&origin, &[], confine_to_one_cpu).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.proc.child.id())).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    assert!(allowed.parse::<usize>().is_ok(), "not one CPU: {allowed}");

    for _ in 0..3 {
        let reply = send(gw.http, entries(PROD)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let refused = send(gw.http, entries(UNKNOWN)).await;
    assert_eq!(
        (refused.status.as_u16(), refused.reason()),
        (401, "invalid_token")
    );
    let metrics = send(gw.admin, get("admin", "/metrics", &[])).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text().contains("stackgate_requests_total"),
        "{}",
        metrics.text()
    );

    assert_eq!(origin.request_count(), 3, "the refusal was not forwarded");
    drain_with_a_slow_request(&mut gw, &origin).await;
    for line in gw.proc.stderr.until_end().await {
        assert_no_secrets(line);
    }
}

// ---------------------------------------------------------------------------
// stackgate demo
// ---------------------------------------------------------------------------

/// One printed curl command.
#[derive(Debug)]
struct Curl {
    method: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
    url: String,
    /// What follows `#`, e.g. `401 invalid_token`.
    comment: String,
}

impl Curl {
    fn parse(line: &str) -> Option<Curl> {
        let line = line.trim();
        if !line.starts_with("curl ") {
            return None;
        }
        let (command, comment) = match line.find(" #") {
            Some(at) if line[..at].matches('\'').count().is_multiple_of(2) => {
                (&line[..at], line[at + 2..].trim())
            }
            _ => (line, ""),
        };
        let mut words = shell_words(command).into_iter().skip(1);
        let mut curl = Curl {
            method: String::new(),
            headers: Vec::new(),
            body: None,
            url: String::new(),
            comment: comment.to_owned(),
        };
        while let Some(word) = words.next() {
            match word.as_str() {
                "-X" => curl.method = words.next()?,
                "-H" => {
                    let header = words.next()?;
                    let (name, value) = header.split_once(':')?;
                    curl.headers
                        .push((name.trim().to_owned(), value.trim().to_owned()));
                }
                "-d" => curl.body = words.next(),
                "|" => break,
                flag if flag.starts_with('-') => {}
                url => curl.url = url.to_owned(),
            }
        }
        if curl.method.is_empty() {
            curl.method = if curl.body.is_some() { "POST" } else { "GET" }.to_owned();
        }
        Some(curl)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn request(&self) -> (SocketAddr, Request<Full<Bytes>>) {
        let uri: http::Uri = self.url.parse().unwrap_or_else(|e| panic!("{e}: {self:?}"));
        let authority = uri.authority().unwrap().as_str();
        let mut request = Request::builder()
            .method(self.method.as_str())
            .uri(uri.path_and_query().unwrap().as_str())
            .header("host", authority);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let body = Bytes::from(self.body.clone().unwrap_or_default());
        (
            authority.parse().unwrap(),
            request.body(Full::new(body)).unwrap(),
        )
    }

    async fn send(&self) -> Reply {
        let (addr, request) = self.request();
        send(addr, request).await
    }
}

/// Splits on blanks outside single quotes; the quotes are removed.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The text after `label` on the line that starts with it (after indentation).
fn labelled<'a>(lines: &'a [String], label: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{}", lines.join("\n")))
        .trim()
}

/// The demo's token values, which must stay out of its logs.
const DEMO_VALUES: [&str; 3] = [
    "cs_demo_website_delivery",
    "cs_demo_website_preview",
    "cs_demo_staging_delivery",
];

#[tokio::test]
async fn demo_walkthrough_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = stackgate(&[]);
    command
        .args(["demo", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .current_dir(dir.path());
    let mut demo = Proc::spawn(command);
    demo.stdout
        .wait_for("the last printed command", |l| l.contains("/admin/stacks"))
        .await;
    let printed = demo.stdout.seen.clone();

    let gateway = labelled(&printed, "gateway");
    assert!(gateway.starts_with("http://127.0.0.1:"), "{gateway}");
    let gateway_addr: SocketAddr = gateway.trim_start_matches("http://").parse().unwrap();
    assert_ne!(gateway_addr.port(), 0);
    let admin = labelled(&printed, "admin");
    let admin_url = admin.split_whitespace().next().unwrap();
    let bearer = admin
        .split("(bearer: ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no bearer in {admin:?}"))
        .to_owned();
    let demo_dir = PathBuf::from(
        labelled(&printed, "tokens")
            .split_whitespace()
            .next()
            .unwrap(),
    )
    .parent()
    .unwrap()
    .to_owned();
    assert!(demo_dir.exists(), "{}", demo_dir.display());
    assert!(
        !printed.iter().any(|l| l.contains("stackgate::")),
        "log lines on stdout: {printed:#?}"
    );

    let commands: Vec<(usize, Curl)> = printed
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((i, Curl::parse(l)?)))
        .collect();
    for (_, curl) in &commands {
        assert!(
            curl.url.starts_with(&format!("{gateway}/"))
                || curl.url.starts_with(&format!("{admin_url}/")),
            "{curl:?} goes neither to {gateway} nor to {admin_url}"
        );
    }

    // Every "Allowed:" command answers 200.
    let allowed: Vec<&Curl> = commands
        .iter()
        .filter(|(i, _)| *i > 0 && printed[i - 1].trim_start().starts_with("Allowed:"))
        .map(|(_, c)| c)
        .collect();
    assert!(
        !allowed.is_empty(),
        "no allowed commands in:\n{}",
        printed.join("\n")
    );
    for curl in &allowed {
        let reply = curl.send().await;
        assert_eq!(reply.status, 200, "{curl:?}: {}", reply.text());
    }

    // Every refusal answers with the status and reason its comment names.
    let mut reasons = Vec::new();
    for (_, curl) in &commands {
        let Some((status, reason)) = curl.comment.split_once(' ') else {
            continue;
        };
        let Ok(status) = status.parse::<u16>() else {
            continue;
        };
        let reply = curl.send().await;
        assert_eq!(
            (reply.status.as_u16(), reply.reason()),
            (status, reason),
            "{curl:?}: {}",
            reply.text()
        );
        reasons.push(reason.to_owned());
    }
    for expected in ["invalid_token", "branch_out_of_scope"] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "{expected} not printed"
        );
    }

    // Revoking the token ends a live stream at once; later requests get token_revoked.
    let find = |what: &str, pick: &dyn Fn(&Curl) -> bool| {
        commands
            .iter()
            .map(|(_, c)| c)
            .find(|c| pick(c))
            .unwrap_or_else(|| panic!("no {what} command in:\n{}", printed.join("\n")))
    };
    let stream = find("stream", &|c| c.url.ends_with("/v3/stream"));
    let revoke = find("revoke", &|c| {
        c.method == "POST" && c.url.ends_with("/revoke")
    });
    let lift = find("lift", &|c| {
        c.method == "DELETE" && c.url.ends_with("/revoke")
    });
    assert_eq!(
        revoke.header("authorization"),
        Some(format!("Bearer {bearer}").as_str())
    );

    let (addr, request) = stream.request();
    let mut body = open(addr, request).await;
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("a first tick");
    assert!(first.is_some_and(|f| f.is_ok()), "the stream did not start");
    let revoked = revoke.send().await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("the stream was not cut off after the revocation");
    assert!(
        end.is_err(),
        "a revoked stream must end abruptly, not look complete"
    );

    let later = allowed[0].send().await;
    assert_eq!(
        (later.status.as_u16(), later.reason()),
        (401, "token_revoked")
    );
    let lifted = lift.send().await;
    assert_eq!(lifted.status, 200, "{}", lifted.text());
    let again = allowed[0].send().await;
    assert_eq!(again.status, 200, "{}", again.text());

    // Ctrl-C stops the demo promptly and cleans up its files.
    demo.signal("INT");
    let status = demo.exit_by(Instant::now() + Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}");
    assert!(!demo_dir.exists(), "{} left behind", demo_dir.display());
    let logs = demo.stderr.until_end().await;
    assert!(
        logs.iter().any(|l| l.contains("stackgate::access")),
        "no access lines on stderr: {logs:#?}"
    );
    for line in logs {
        assert!(!line.contains(&bearer), "the bearer leaked: {line}");
        for value in DEMO_VALUES {
            assert!(!line.contains(value), "{value} leaked: {line}");
        }
    }
}

/// Sends `request` on a fresh HTTP/1.1 connection; returns the body unread.
async fn open(addr: SocketAddr, request: Request<Full<Bytes>>) -> hyper::body::Incoming {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response.into_body()
}

/// Out of descriptors, the admin listener's accept fails (EMFILE) for as
/// long as connections wait in its backlog. It must back off, not spin:
/// each failure waits twice as long as the one before (10 ms, 20 ms, ...),
/// which its log lines say. Run with a limit of 64 descriptors, then
/// connections to the admin port until accepting fails.
#[tokio::test]
async fn the_admin_listener_backs_off_when_out_of_descriptors() {
    use std::os::unix::process::CommandExt;
    const LIMIT: libc::rlim_t = 64;
    let origin = spawn_origin().await;
    let mut gw = run_gateway_with(&origin, &[], |command| {
        // SAFETY: the closure only makes one async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: LIMIT,
                    rlim_max: LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    })
    .await;
    // More connections than the gateway has descriptors left: the backlog
    // keeps the rest, and accepting them fails.
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        held.push(TcpStream::connect(gw.admin).await.unwrap());
    }
    let backed_off = gw
        .proc
        .stderr
        .wait_for("the fifth failed admin accept in a row", |l| {
            l.contains("admin accept failed") && l.contains("wait=160ms")
        })
        .await;
    assert!(backed_off.contains("WARN"), "{backed_off}");
    let failures = gw
        .proc
        .stderr
        .seen
        .iter()
        .filter(|l| l.contains("admin accept failed"))
        .count();
    assert!(
        failures <= 8,
        "{failures} failed accepts logged before the fifth backoff: it spins"
    );
    drop(held);
}
