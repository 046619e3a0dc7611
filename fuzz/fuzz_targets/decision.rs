//! Any bytes as a request head: line 1 the method, line 2 the URI, then
//! `name: value` header lines (what doesn't parse is dropped, best effort).
//! `check_http` and `decide` run against a fixed world (four routes by host,
//! two by prefix on any host, the demo tokens with one revoked); neither may
//! panic, and a forwarded request carries no management credential and no
//! credential in its query.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use stackgate::config::{RegistrySettings, Source};
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

fuzz_target!(|data: &[u8]| {
    let world = world();
    let parts = head(data);
    let _ = check_http(&parts, 1 << 20);
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
    }
});
