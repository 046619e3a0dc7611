//! Any bytes as a request head: line 1 the method, line 2 the URI, then
//! `name: value` header lines (what doesn't parse is dropped, best effort).
//! `check_http` and `decide` run against a fixed world (four routes by host,
//! two by prefix on any host, the demo tokens with one revoked); neither may
//! panic, and a forwarded request carries no management credential and no
//! credential in its query. A request that passes row 16 and is forwarded
//! is rebuilt as the origin would receive it, and read the way a lenient
//! server reads it: every credential, scope and routing value in it is one
//! that was checked.

#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use stackgate::config::{RegistrySettings, Source};
use stackgate::conn::ConnInfo;
use stackgate::metrics::Metrics;
use stackgate::proxy::outgoing::upstream_request;
use stackgate::sessions::Sessions;
use stackgate::decision::{check_http, decide, Decision};
use stackgate::registry::diff::next;
use stackgate::registry::parse::parse_token_list;
use stackgate::registry::{Registry, StackRegistry, Stacks};
use stackgate::route::{Cors, Route, RouteKind, Router, Upstream};

struct World {
    router: Router,
    stacks: Stacks,
}

fn route(index: usize, kind: RouteKind, host: &str, prefix: Option<&str>) -> Arc<Route> {
    Arc::new(Route {
        index,
        kind,
        hosts: vec![host.to_owned()],
        path_prefix: prefix.map(str::to_owned),
        upstream: Upstream {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("origin.invalid"),
        },
        cors: Cors::default(),
    })
}

fn settings() -> RegistrySettings {
    RegistrySettings {
        source: Source::File {
            path: PathBuf::new(),
        },
        snapshot: None,
        max_removal_ratio: 0.5,
        max_staleness: Some(Duration::from_secs(24 * 3600)),
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let router = Router::new(&[
            route(0, RouteKind::Delivery, "cdn.test", None),
            route(1, RouteKind::Preview, "preview.test", None),
            route(2, RouteKind::Graphql, "graphql.test", None),
            route(3, RouteKind::GraphqlPreview, "gqlpreview.test", None),
            route(4, RouteKind::Preview, "*", Some("/preview")),
            route(5, RouteKind::Graphql, "*", Some("/graphql")),
        ]);
        let page = parse_token_list(include_bytes!("../../config/demo-tokens.json"))
            .unwrap_or_else(|_| unreachable!("the demo token list parses"));
        let registry = next(&Registry::default(), page.tokens, 0)
            .and_then(|(r, _)| r.with_admin_revocation("blt_demo_staging", true))
            .unwrap_or_else(|| unreachable!("the demo registry builds"));
        let stacks = Stacks::new(vec![Arc::new(StackRegistry::with_registry(
            0,
            "demo",
            "blt_demo_stack",
            settings(),
            registry,
        ))]);
        World { router, stacks }
    })
}

fn head(data: &[u8]) -> http::request::Parts {
    let mut lines = data.split(|&b| b == b'\n');
    let method = lines
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let uri = lines
        .next()
        .and_then(|u| Uri::try_from(u).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            builder = builder.header(name, value);
        }
    }
    match builder.body(()) {
        Ok(request) => request.into_parts().0,
        Err(_) => Request::new(()).into_parts().0,
    }
}

fn sessions() -> &'static Arc<Sessions> {
    static SESSIONS: OnceLock<Arc<Sessions>> = OnceLock::new();
    SESSIONS.get_or_init(|| {
        let metrics = Metrics::new().unwrap_or_else(|_| unreachable!("metrics register"));
        Sessions::new(metrics, vec![Arc::from("demo")])
    })
}

/// A name as a lenient server reads it: any case, `-` as `_`, `name[..]` as `name`.
fn lenient(name: &str) -> String {
    let name = name.split('[').next().unwrap_or(name);
    name.to_ascii_lowercase().replace('-', "_")
}

/// What the origin would receive, read leniently, is what was checked
/// (SPEC §2): one token (the one presented in its checked header), the
/// stack's api_key (REST), environments and branches inside the token's
/// scope, and a path with nothing left to resolve.
fn assert_one_reading(parts: &http::request::Parts, permit: &stackgate::decision::Permit<'_>) {
    let conn = ConnInfo::new(
        std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        "http",
        sessions().connection(),
    );
    let Some(request) = upstream_request(parts, permit, &conn, bytes::Bytes::new(), false) else {
        return;
    };
    let mut values: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for (name, value) in request.headers() {
        values.entry(lenient(name.as_str())).or_default().push(value.as_bytes().to_vec());
    }
    let query = request.uri().query().unwrap_or("");
    for pair in query.split(['&', ';']) {
        for (key, value) in form_urlencoded::parse(pair.as_bytes()) {
            values.entry(lenient(&key)).or_default().push(value.as_bytes().to_vec());
        }
    }
    let all = |name: &str| values.get(name).cloned().unwrap_or_default();
    let presented = |name: &str| parts.headers.get(name).map(|v| v.as_bytes().to_vec());
    let (credential, other) = if permit.route.kind.is_preview() {
        ("preview_token", "access_token")
    } else {
        ("access_token", "preview_token")
    };
    assert_eq!(all(credential), presented(credential).into_iter().collect::<Vec<_>>());
    if !permit.route.kind.is_preview() {
        assert!(all(other).is_empty(), "an unchecked {other} forwarded");
    } else {
        assert!(all(other).len() <= 1);
    }
    if permit.route.kind.api_key_in_path() {
        assert!(all("api_key").is_empty(), "an unchecked api_key forwarded");
    } else {
        assert_eq!(all("api_key"), vec![permit.stack.api_key.as_bytes().to_vec()]);
    }
    for environment in all("environment") {
        let environment = String::from_utf8_lossy(&environment).into_owned();
        assert!(permit.token.scope.allows_environment(&environment), "{environment}");
    }
    for branch in all("branch") {
        let branch = String::from_utf8_lossy(&branch).trim().to_owned();
        assert!(permit.token.scope.allows_branch(&branch), "{branch}");
    }
    assert!(request.headers().get("host").is_none());
    // Nothing left for a lenient server to resolve: no encoded slash, no
    // empty segment but a trailing one, no dot-segment (`%2e` read as `.`).
    let path = request.uri().path();
    let lowered = path.to_ascii_lowercase();
    assert!(!lowered.contains("%2f") && !lowered.contains("%5c"), "{path}");
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (at, segment) in segments.iter().enumerate() {
        let dots = segment.to_ascii_lowercase().replace("%2e", ".");
        let bare = dots.split(';').next().unwrap_or("");
        assert!(bare != "." && bare != "..", "{path}");
        assert!(!segment.is_empty() || at + 1 == segments.len(), "{path}");
    }
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let parts = head(data);
    let checked = check_http(&parts, 1 << 20).is_ok();
    if let Decision::Forward(permit) = decide(
        &world.router,
        &world.stacks,
        &parts,
        tokio::time::Instant::now(),
    ) {
        assert!(!parts.headers.contains_key("authorization"));
        assert!(!parts.headers.contains_key("authtoken"));
        let query = parts.uri.query().unwrap_or("").to_ascii_lowercase();
        for param in ["api_key=", "access_token=", "preview_token="] {
            assert!(!query.starts_with(param) && !query.contains(&format!("&{param}")));
        }
        assert_eq!(&*permit.stack.api_key, "blt_demo_stack");
        if checked {
            assert_one_reading(&parts, &permit);
        }
    }
});
