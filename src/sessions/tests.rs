use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};

use super::*;
use crate::config::{RegistrySettings, Source};
use crate::registry::{Change, Diff, Environment, Registry, Scope, StackRegistry};
use crate::route::{Cors, Route, RouteKind, Upstream};

struct Fixture {
    sessions: Arc<Sessions>,
    metrics: Metrics,
    route: Route,
    stack: Arc<StackRegistry>,
}

fn fixture() -> Fixture {
    let metrics = Metrics::new().unwrap();
    let sessions = Sessions::new(metrics.clone(), vec![Arc::from("website")]);
    let route = Route {
        index: 0,
        kind: RouteKind::Delivery,
        hosts: vec!["*".into()],
        path_prefix: None,
        upstream: Upstream {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("origin.invalid"),
        },
        cors: Cors::default(),
    };
    let settings = RegistrySettings {
        source: Source::File {
            path: PathBuf::new(),
        },
        snapshot: None,
        max_removal_ratio: 1.0,
        max_staleness: None,
    };
    let stack = Arc::new(StackRegistry::with_registry(
        0,
        "website",
        "k",
        settings,
        Registry::default(),
    ));
    Fixture {
        sessions,
        metrics,
        route,
        stack,
    }
}

fn token(uid: &str, branches: &[&str]) -> Arc<Token> {
    Arc::new(Token {
        usage: Default::default(),
        uid: Arc::from(uid),
        name: uid.into(),
        scope: Arc::new(Scope {
            environments: vec![Environment {
                name: "production".into(),
                uid: "e1".into(),
            }],
            branches: Some(branches.iter().map(|b| b.to_string()).collect()),
            aliases: None,
        }),
        delivery: crate::registry::Digest::of(uid.as_bytes()),
        preview: None,
    })
}

fn permit<'a>(
    f: &'a Fixture,
    token: &Arc<Token>,
    kind: SessionKind,
    branch: &'a str,
) -> Permit<'a, 'a> {
    Permit {
        route: &f.route,
        path: std::borrow::Cow::Borrowed("/"),
        stack: &f.stack,
        token: Arc::clone(token),
        session: kind,
        environments: Default::default(),
        branch: branch.into(),
        branch_rewritten: false,
        version: 1,
        query_canonical: true,
    }
}

fn change(diff: Diff, tokens: Vec<Token>) -> Change {
    Change {
        diff,
        registry: Arc::new(Registry::from_parts(
            2,
            tokens,
            Default::default(),
            Default::default(),
        )),
        learned_at: Instant::now(),
    }
}

fn removed(uid: &str) -> Diff {
    Diff {
        removed: vec![uid.into()],
        ..Diff::default()
    }
}

fn is_cancelled(guard: &RequestGuard) -> bool {
    guard.cancel().expect("an HTTP/2 stream").is_cancelled()
}

async fn closed_within(revocation: Revocation) {
    tokio::time::timeout(Duration::from_secs(5), revocation.closed())
        .await
        .expect("revocation did not complete");
}

#[tokio::test]
async fn http1_revocation_closes_the_connection_and_finishes_when_it_is_gone() {
    let f = fixture();
    let a = token("a", &["main"]);
    let conn = f.sessions.connection();
    let guard = f
        .sessions
        .begin(&conn, &permit(&f, &a, SessionKind::Delivery, "main"), false);
    drop(guard); // an idle keep-alive connection: no request in flight
    assert_eq!(f.sessions.live(0, "a"), 1);
    f.sessions.export();
    assert!(f
        .metrics
        .render()
        .contains("stackgate_active_sessions{stack=\"website\",token=\"a\"} 1"));

    let revocation = f.sessions.revoke(0, &change(removed("a"), vec![]), false);
    assert_eq!(revocation.cancelled, 1);
    assert!(
        conn.cancel.is_cancelled(),
        "the connection must be told to close"
    );
    drop(conn); // the connection task ends
    closed_within(revocation).await;
    assert_eq!(f.sessions.live(0, "a"), 0);
    f.sessions.export();
    let text = f.metrics.render();
    assert!(
        !text.contains("stackgate_active_sessions{stack=\"website\",token=\"a\"}"),
        "{text}"
    );
    assert!(text
        .contains("stackgate_sessions_dropped_total{cause=\"token_deleted\",stack=\"website\"} 1"));
    assert!(text.contains("stackgate_revocation_seconds_count 1"));
}

#[tokio::test]
async fn http2_revocation_resets_only_that_tokens_streams() {
    let f = fixture();
    let (a, b) = (token("a", &["main"]), token("b", &["main"]));
    let conn = f.sessions.connection();
    let stream_a = f
        .sessions
        .begin(&conn, &permit(&f, &a, SessionKind::Delivery, "main"), true);
    let stream_b = f
        .sessions
        .begin(&conn, &permit(&f, &b, SessionKind::Delivery, "main"), true);

    let revocation = f
        .sessions
        .revoke(0, &change(removed("a"), vec![Token::clone(&b)]), false);
    assert_eq!(revocation.cancelled, 1);
    assert!(is_cancelled(&stream_a));
    assert!(!is_cancelled(&stream_b));
    assert!(!conn.cancel.is_cancelled(), "the connection stays up for b");
    drop(stream_a);
    closed_within(revocation).await;
    assert_eq!(
        f.sessions.live(0, "a"),
        0,
        "a's session ends with its streams"
    );
    assert_eq!(f.sessions.live(0, "b"), 1);
}

#[tokio::test]
async fn deleting_a_preview_token_ends_preview_sessions_only() {
    let f = fixture();
    let a = token("a", &["main"]);
    let delivery_conn = f.sessions.connection();
    let preview_conn = f.sessions.connection();
    let _d = f.sessions.begin(
        &delivery_conn,
        &permit(&f, &a, SessionKind::Delivery, "main"),
        false,
    );
    let _p = f.sessions.begin(
        &preview_conn,
        &permit(&f, &a, SessionKind::Preview, "main"),
        false,
    );
    let diff = Diff {
        preview_removed: vec!["a".into()],
        ..Diff::default()
    };
    let revocation = f
        .sessions
        .revoke(0, &change(diff, vec![Token::clone(&a)]), false);
    assert_eq!(revocation.cancelled, 1);
    assert!(preview_conn.cancel.is_cancelled());
    assert!(!delivery_conn.cancel.is_cancelled());
}

#[tokio::test]
async fn narrowing_ends_only_uses_outside_the_new_scope() {
    let f = fixture();
    let wide = token("a", &["main", "dev"]);
    let narrow = Token::clone(&token("a", &["main"]));
    // HTTP/2: one stream on main, one on dev.
    let h2 = f.sessions.connection();
    let on_main = f
        .sessions
        .begin(&h2, &permit(&f, &wide, SessionKind::Delivery, "main"), true);
    let on_dev = f
        .sessions
        .begin(&h2, &permit(&f, &wide, SessionKind::Delivery, "dev"), true);
    // HTTP/1.1: one connection used for main only, one that read dev once.
    let h1_main = f.sessions.connection();
    drop(f.sessions.begin(
        &h1_main,
        &permit(&f, &wide, SessionKind::Delivery, "main"),
        false,
    ));
    let h1_dev = f.sessions.connection();
    drop(f.sessions.begin(
        &h1_dev,
        &permit(&f, &wide, SessionKind::Delivery, "dev"),
        false,
    ));
    drop(f.sessions.begin(
        &h1_dev,
        &permit(&f, &wide, SessionKind::Delivery, "main"),
        false,
    ));

    let diff = Diff {
        narrowed: vec!["a".into()],
        ..Diff::default()
    };
    let revocation = f.sessions.revoke(0, &change(diff, vec![narrow]), false);
    assert_eq!(revocation.cancelled, 2);
    assert!(is_cancelled(&on_dev));
    assert!(!is_cancelled(&on_main));
    assert!(h1_dev.cancel.is_cancelled());
    assert!(!h1_main.cancel.is_cancelled());
    assert!(!h2.cancel.is_cancelled());
}

#[tokio::test]
async fn a_revocation_with_nothing_to_cancel_completes_at_once() {
    let f = fixture();
    let revocation = f
        .sessions
        .revoke(0, &change(removed("nobody"), vec![]), false);
    assert_eq!(revocation.cancelled, 0);
    closed_within(revocation).await;
}

#[tokio::test]
async fn a_session_cycling_through_many_branches_is_bounded_and_still_ended_by_narrowing() {
    let f = fixture();
    let all = token("a", &["$all"]);
    let conn = f.sessions.connection();
    for i in 0..(MAX_TRACKED_USES + 10) {
        drop(f.sessions.begin(
            &conn,
            &permit(&f, &all, SessionKind::Delivery, &format!("b{i}")),
            false,
        ));
    }
    {
        let key = TokenKey {
            stack: 0,
            uid: Arc::from("a"),
        };
        let entry = f.sessions.by_token.get(&key).unwrap();
        let session = entry.values().next().unwrap();
        assert_eq!(session.used.len(), MAX_TRACKED_USES);
        assert!(session.used_overflow);
    }
    // Narrowed to a list that covers every remembered branch: the forgotten
    // ones may not be covered, so the connection ends.
    let remembered: Vec<String> = (0..MAX_TRACKED_USES).map(|i| format!("b{i}")).collect();
    let names: Vec<&str> = remembered.iter().map(String::as_str).collect();
    let diff = Diff {
        narrowed: vec!["a".into()],
        ..Diff::default()
    };
    let revocation = f.sessions.revoke(
        0,
        &change(diff, vec![Token::clone(&token("a", &names))]),
        false,
    );
    assert_eq!(revocation.cancelled, 1);
    assert!(conn.cancel.is_cancelled());
}

#[tokio::test]
async fn repeated_http1_uses_are_recorded_once_and_still_revoked() {
    let f = fixture();
    let wide = token("a", &["main", "dev"]);
    let other = token("b", &["main"]);
    let conn = f.sessions.connection();
    // A keep-alive connection alternating between two tokens, many times.
    for _ in 0..100 {
        for t in [&wide, &other] {
            let guard =
                f.sessions
                    .begin(&conn, &permit(&f, t, SessionKind::Delivery, "main"), false);
            assert!(
                guard.cancel().is_none(),
                "HTTP/1.1 has no per-request token"
            );
        }
    }
    for uid in ["a", "b"] {
        let key = TokenKey {
            stack: 0,
            uid: Arc::from(uid),
        };
        let entry = f.sessions.by_token.get(&key).unwrap();
        assert_eq!(entry.len(), 1, "one session per token and connection");
        let session = entry.values().next().unwrap();
        assert_eq!(session.used.len(), 1, "the use is recorded once");
        assert!(session.requests.is_empty(), "nothing kept per request");
    }
    // A new use on the same connection is still recorded...
    drop(f.sessions.begin(
        &conn,
        &permit(&f, &wide, SessionKind::Delivery, "dev"),
        false,
    ));
    // ...so narrowing `a` to main ends the connection.
    let diff = Diff {
        narrowed: vec!["a".into()],
        ..Diff::default()
    };
    let narrow = Token::clone(&token("a", &["main"]));
    let revocation = f.sessions.revoke(0, &change(diff, vec![narrow]), false);
    assert_eq!(revocation.cancelled, 1);
    assert!(conn.cancel.is_cancelled());
}

#[tokio::test]
async fn a_connection_using_many_tokens_keeps_one_session_each_past_the_short_list() {
    let f = fixture();
    let conn = f.sessions.connection();
    let uids: Vec<String> = (0..3 * OPEN_LIST_MAX).map(|i| format!("t{i}")).collect();
    let tokens: Vec<Arc<Token>> = uids.iter().map(|uid| token(uid, &["main"])).collect();
    // Every token twice, so that the second use of each is found again
    // after the connection's list has become a map.
    for _ in 0..2 {
        for t in &tokens {
            drop(
                f.sessions
                    .begin(&conn, &permit(&f, t, SessionKind::Delivery, "main"), false),
            );
        }
    }
    assert!(
        matches!(*conn.open.lock().unwrap(), Open::Many(_)),
        "past the short list"
    );
    for uid in &uids {
        assert_eq!(f.sessions.live(0, uid), 1, "one session for {uid}");
    }
    // Removing the last token still finds and ends its session.
    let last = uids.last().unwrap();
    let revocation = f.sessions.revoke(0, &change(removed(last), vec![]), false);
    assert_eq!(revocation.cancelled, 1);
    assert!(conn.cancel.is_cancelled());
    drop(conn);
    closed_within(revocation).await;
    for uid in &uids {
        assert_eq!(
            f.sessions.live(0, uid),
            0,
            "{uid} closed with the connection"
        );
    }
}
