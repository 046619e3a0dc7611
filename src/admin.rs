//! The admin listener (SPEC §7): health, readiness, metrics, and the
//! bearer-protected `/admin/*` API. No answer here ever holds a token value.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::registry::snapshot::{age_secs, unix_secs};
use crate::registry::Digest;
use crate::response::{self, Body};
use crate::state::Shared;

/// How long an admin revocation waits for its snapshot write before answering.
pub const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The first wait after a failed accept; it doubles while accepts keep failing.
pub const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
/// The longest wait after failed accepts.
pub const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the admin listener until shutdown.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    cluster: Option<Arc<Cluster>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors (EMFILE) and the like: retrying at
                    // once would spin. Wait, longer each time in a row.
                    tracing::warn!(error = %err, wait = ?backoff, "admin accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let shared = Arc::clone(&shared);
        let cluster = cluster.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service =
                service_fn(move |request| handle(Arc::clone(&shared), cluster.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Answers one admin request.
pub async fn handle(
    shared: Arc<Shared>,
    cluster: Option<Arc<Cluster>>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            // Walking every session and series takes milliseconds with many
            // tokens: off the runtime that serves requests.
            let rendered = off_runtime(&shared, |shared| {
                shared.sessions.export();
                shared.metrics.render()
            });
            match rendered.await {
                Some(text) => response::text(StatusCode::OK, "text/plain; version=0.0.4", text),
                None => unavailable(),
            }
        }
        (&Method::GET, "/healthz") => {
            response::text(StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        (&Method::GET, "/readyz") => readyz(&shared),
        (_, p) if p.starts_with("/admin/") => {
            if !authorized(&shared, &request) {
                return Ok(response::admin_error(
                    StatusCode::UNAUTHORIZED,
                    "A valid admin bearer token is required.",
                ));
            }
            match cluster {
                Some(cluster) => {
                    cluster_admin(&shared, &cluster, &method, p, request.uri().query()).await
                }
                None => admin(&shared, &method, p, request.uri().query()).await,
            }
        }
        _ => response::admin_error(StatusCode::NOT_FOUND, "Not found."),
    };
    Ok(response)
}

fn authorized(shared: &Shared, request: &Request<Incoming>) -> bool {
    let Some(expected) = &shared.config.admin_token else {
        return false;
    };
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    bearer_matches(presented, expected.expose())
}

/// Compares the SHA-256 digests of the two bearers in constant time: the
/// time taken does not depend on where they differ, nor on either length
/// (comparing the raw bytes returns at once on a length mismatch, which
/// would tell the expected length).
fn bearer_matches(presented: &str, expected: &str) -> bool {
    let presented = Digest::of(presented.as_bytes());
    let expected = Digest::of(expected.as_bytes());
    presented == expected
}

/// Runs `work` on a blocking thread; `None` if it could not run (shutdown).
async fn off_runtime<T: Send + 'static>(
    shared: &Arc<Shared>,
    work: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Option<T> {
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || work(&shared))
        .await
        .ok()
}

fn unavailable() -> Response<Body> {
    response::admin_error(StatusCode::SERVICE_UNAVAILABLE, "Shutting down.")
}

/// The segments of an `/admin/...` path after `/admin`.
fn segments(path: &str) -> Vec<&str> {
    path.trim_end_matches('/').split('/').skip(2).collect()
}

/// `?force=true` (or `1`) on `/admin/sync`.
fn forced(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "force" && (v == "true" || v == "1"))
    })
}

async fn admin(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    let segments = segments(path);
    match (method, segments.as_slice()) {
        (&Method::POST, ["sync"]) => {
            let force = forced(query);
            let mut stacks = BTreeMap::new();
            for stack in shared.stacks.iter() {
                let report = shared.sync_stack(stack, force).await;
                stacks.insert(
                    stack.name.to_string(),
                    serde_json::to_value(report).unwrap_or(Value::Null),
                );
            }
            response::json(StatusCode::OK, &json!({ "stacks": stacks }))
        }
        (&Method::POST, ["tokens", uid, "revoke"]) => set_revocation(shared, uid, true).await,
        (&Method::DELETE, ["tokens", uid, "revoke"]) => set_revocation(shared, uid, false).await,
        (&Method::GET, ["tokens"]) => match off_runtime(shared, tokens).await {
            Some(list) => response::json(StatusCode::OK, &list),
            None => unavailable(),
        },
        (&Method::GET, ["stacks"]) => response::json(StatusCode::OK, &stacks(shared)),
        _ => response::admin_error(StatusCode::NOT_FOUND, "Not found."),
    }
}

/// The admin API in cluster mode (SPEC §10): `/admin/cluster`; `sync`
/// through the poller; revocations applied here at once and published to
/// every node; `/admin/stacks` with `leader` and `cluster_version`. The
/// rest as standalone.
async fn cluster_admin(
    shared: &Arc<Shared>,
    cluster: &Cluster,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    let segments = segments(path);
    match (method, segments.as_slice()) {
        (&Method::GET, ["cluster"]) => response::json(StatusCode::OK, &cluster.status()),
        (&Method::POST, ["sync"]) => {
            let force = forced(query);
            response::json(StatusCode::OK, &cluster.sync(force).await)
        }
        (&Method::POST | &Method::DELETE, ["tokens", uid, "revoke"]) => {
            let revoked = method == Method::POST;
            let known = cluster.stacks_knowing(uid);
            // Here at once (sessions cut, snapshot written) and in Redis for
            // the other nodes, side by side.
            let (answer, ()) = tokio::join!(
                set_revocation(shared, uid, revoked),
                cluster.publish_revocation(uid, revoked, &known)
            );
            answer
        }
        (&Method::GET, ["stacks"]) => {
            let mut value = stacks(shared);
            if let Some(list) = value.get_mut("stacks").and_then(Value::as_array_mut) {
                for (index, entry) in list.iter_mut().enumerate() {
                    let (leader, version) = cluster.stack_view(index);
                    if let Some(entry) = entry.as_object_mut() {
                        entry.insert("leader".to_owned(), json!(leader));
                        entry.insert("cluster_version".to_owned(), json!(version));
                    }
                }
            }
            response::json(StatusCode::OK, &value)
        }
        _ => admin(shared, method, path, query).await,
    }
}

async fn set_revocation(shared: &Shared, uid: &str, revoked: bool) -> Response<Body> {
    let mut found = Vec::new();
    let mut cancelled = 0;
    let mut persisted = true;
    let mut written = Vec::new();
    for stack in shared.stacks.iter() {
        match stack.set_admin_revocation(uid, revoked) {
            Ok(Some(change)) => {
                // A lift ends nothing, but the registry's version moved.
                cancelled += shared.apply_change(stack, &change, true);
                tracing::info!(stack = %stack.name, token = uid, revoked, "admin revocation changed");
                written.push((stack, change.registry.version()));
                found.push(stack.name.to_string());
            }
            Ok(None) => {
                // Already so; persisted only if the file holds it.
                let version = stack.view().map_or(0, |v| v.registry.version());
                written.push((stack, version));
                found.push(stack.name.to_string());
            }
            Err(_unknown) => {}
        }
    }
    if found.is_empty() {
        return response::admin_error(
            StatusCode::NOT_FOUND,
            "No stack lists a token with this uid.",
        );
    }
    // Every session was cut above; the answer waits until the change is on disk.
    for (stack, version) in written {
        if stack.settings().snapshot.is_none() {
            tracing::warn!(stack = %stack.name, "admin revocation applied but not persisted: the stack has no snapshot");
            persisted = false;
        } else if !stack.wait_snapshot(version, SNAPSHOT_WAIT).await {
            tracing::warn!(stack = %stack.name, "admin revocation applied but not persisted: the snapshot was not written");
            persisted = false;
        }
    }
    response::json(
        StatusCode::OK,
        &json!({
            "uid": uid,
            "revoked": revoked,
            "stacks": found,
            "sessions_cancelled": cancelled,
            "persisted": persisted,
        }),
    )
}

fn tokens(shared: &Shared) -> Value {
    let mut list = Vec::new();
    for stack in shared.stacks.iter() {
        let Some(view) = stack.view() else { continue };
        let registry = &view.registry;
        let mut tokens: Vec<_> = registry.tokens().collect();
        tokens.sort_by(|a, b| a.uid.cmp(&b.uid));
        for token in tokens {
            let usage = &token.usage;
            let environment = token
                .scope
                .environments
                .first()
                .map(|e| json!({ "name": e.name, "uid": e.uid }));
            list.push(json!({
                "uid": &*token.uid,
                "name": token.name,
                "stack": &*stack.name,
                "environment": environment,
                "branches": token.scope.branches,
                "aliases": token.scope.aliases,
                "has_preview": token.preview.is_some(),
                "revoked": registry.is_admin_revoked(&token.uid),
                "live_sessions": shared.sessions.live(stack.index, &token.uid),
                "requests": usage.requests(),
                "rejections": usage.rejections(),
                "last_used": usage.last_used(),
            }));
        }
    }
    json!({ "tokens": list })
}

fn stacks(shared: &Shared) -> Value {
    let list: Vec<Value> = shared
        .stacks
        .iter()
        .map(|stack| {
            let status = stack.status();
            let view = stack.view();
            json!({
                "name": &*stack.name,
                "loaded": view.is_some(),
                "tokens": view.as_ref().map_or(0, |v| v.registry.len()),
                "registry_version": view.as_ref().map_or(0, |v| v.registry.version()),
                "last_success": status.last_success.map(unix_secs),
                "last_error": status.last_error.as_ref().map(|e| e.to_string()),
                "last_error_at": status.last_error_at.map(unix_secs),
                "consecutive_failures": status.consecutive_failures,
                "snapshot_age_seconds": status.snapshot_written.map(age_secs),
                "snapshot_error": status.snapshot_error,
                "held_back_removals": status.held_back,
            })
        })
        .collect();
    json!({ "stacks": list })
}

fn readyz(shared: &Shared) -> Response<Body> {
    let waiting: Vec<&str> = shared
        .stacks
        .iter()
        .filter(|s| s.view().is_none())
        .map(|s| &*s.name)
        .collect();
    if waiting.is_empty() {
        response::text(StatusCode::OK, "text/plain", "ready\n".to_owned())
    } else {
        response::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "ready": false, "waiting_for": waiting }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_matches;

    #[test]
    fn bearers_match_only_when_equal() {
        assert!(bearer_matches("s3cret-bearer", "s3cret-bearer"));
        assert!(!bearer_matches("s3cret-beare", "s3cret-bearer"));
        assert!(!bearer_matches("", "s3cret-bearer"));
        assert!(!bearer_matches("s3cret-bearer-and-more", "s3cret-bearer"));
        assert!(!bearer_matches("S3cret-bearer", "s3cret-bearer"));
    }
}
