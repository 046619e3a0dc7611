//! One case per row of SPEC §3, plus the cases that need care.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Method, Request};

use super::*;
use crate::config::{RegistrySettings, Source};
use crate::registry::diff::next;
use crate::registry::{Digest, Environment, Registry, Scope, Token};
use crate::route::{Cors, Route, RouteKind, Upstream};

fn route(index: usize, kind: RouteKind, host: &str) -> Arc<Route> {
    Arc::new(Route {
        index,
        kind,
        hosts: vec![host.to_owned()],
        path_prefix: None,
        upstream: Upstream {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("origin.invalid"),
        },
        cors: Cors::default(),
    })
}

fn token(
    uid: &str,
    value: &str,
    preview: Option<&str>,
    env: (&str, &str),
    branches: Option<&[&str]>,
    aliases: Option<&[&str]>,
) -> Token {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    Token {
        usage: Default::default(),
        uid: Arc::from(uid),
        name: uid.to_owned(),
        scope: Arc::new(Scope {
            environments: vec![Environment {
                name: env.0.into(),
                uid: env.1.into(),
            }],
            branches: branches.map(list),
            aliases: aliases.map(list),
        }),
        delivery: Digest::of(value.as_bytes()),
        preview: preview.map(|p| Digest::of(p.as_bytes())),
    }
}

/// Settings for a stack served from memory (also used by the property tests).
pub(super) fn settings(max_staleness: Duration) -> RegistrySettings {
    RegistrySettings {
        source: Source::File {
            path: PathBuf::new(),
        },
        snapshot: None,
        max_removal_ratio: 0.5,
        max_staleness: Some(max_staleness),
    }
}

/// The routes and stacks a decision is made against.
pub(crate) struct World {
    pub(crate) router: Router,
    pub(crate) stacks: Stacks,
}

impl World {
    /// [`decide`] on this world, as a connection's first request (no digest
    /// remembered).
    pub(crate) fn decide<'p>(&self, parts: &'p Parts, now: Instant) -> Decision<'_, 'p> {
        decide(
            &self.router,
            &self.stacks,
            parts,
            &DigestMemo::default(),
            now,
        )
    }
}

/// Routes for `cdn.test`, `preview.test`, `graphql.test`, `gqlpreview.test`,
/// and stacks `blt_site` (tokens `cs_prod`, `cs_prod_preview`, ...),
/// `blt_unloaded`, `blt_stale`.
pub(crate) fn world() -> World {
    let router = Router::new(&[
        route(0, RouteKind::Delivery, "cdn.test"),
        route(1, RouteKind::Preview, "preview.test"),
        route(2, RouteKind::Graphql, "graphql.test"),
        route(3, RouteKind::GraphqlPreview, "gqlpreview.test"),
    ]);
    let prod = token(
        "blt_prod",
        "cs_prod",
        Some("cs_prod_preview"),
        ("production", "env_prod"),
        Some(&["main", "development"]),
        Some(&["deploy"]),
    );
    let other = token(
        "blt_other",
        "cs_other",
        Some("cs_other_preview"),
        ("staging", "env_staging"),
        None,
        None,
    );
    let all = token(
        "blt_all",
        "cs_all",
        None,
        ("production", "env_prod"),
        Some(&["$all"]),
        None,
    );
    let gone = token(
        "blt_gone",
        "cs_gone",
        Some("cs_gone_preview"),
        ("production", "env_prod"),
        None,
        None,
    );
    let admin = token(
        "blt_admin",
        "cs_admin",
        Some("cs_admin_preview"),
        ("production", "env_prod"),
        None,
        None,
    );
    let live = vec![prod.clone(), other.clone(), all.clone(), admin.clone()];
    let (first, _) = next(
        &Registry::default(),
        vec![
            prod.clone(),
            other.clone(),
            all.clone(),
            gone,
            admin.clone(),
        ],
        0,
    )
    .unwrap();
    let (registry, _) = next(&first, live, 1).unwrap();
    let registry = registry.with_admin_revocation("blt_admin", true).unwrap();
    let stacks = Stacks::new(vec![
        Arc::new(StackRegistry::with_registry(
            0,
            "website",
            "blt_site",
            settings(Duration::from_secs(3600)),
            registry,
        )),
        Arc::new(StackRegistry::new(
            1,
            "unloaded",
            "blt_unloaded",
            settings(Duration::from_secs(3600)),
            crate::registry::source::Source::File(crate::registry::source::FileSource::new(
                PathBuf::new(),
            )),
        )),
        Arc::new(StackRegistry::with_registry(
            2,
            "stale",
            "blt_stale",
            settings(Duration::from_millis(1)),
            Registry::default(),
        )),
    ]);
    World { router, stacks }
}

#[derive(Debug, PartialEq)]
enum Expect {
    Forward(&'static str, SessionKind),
    Preflight,
    Refuse(&'static str),
}
use Expect::*;

fn run(world: &World, method: Method, host: &str, uri: &str, headers: &[(&str, &str)]) -> Expect {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let (parts, ()) = builder.body(()).unwrap().into_parts();
    // Later than the stale stack's 1 ms, well inside the others' hour.
    let now = Instant::now() + Duration::from_secs(1);
    let outcome = match world.decide(&parts, now) {
        Decision::Forward(permit) => {
            let uid: &'static str = Box::leak(permit.token.uid.to_string().into_boxed_str());
            Forward(uid, permit.session)
        }
        Decision::Preflight(_) => Preflight,
        Decision::Refuse(refusal) => Refuse(refusal.reject.reason()),
    };
    outcome
}

/// Name, method, host, URI, headers, expected outcome.
type Case = (
    &'static str,
    Method,
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    Expect,
);

const SITE: (&str, &str) = ("api_key", "blt_site");
const PROD: (&str, &str) = ("access_token", "cs_prod");
const PROD_PREVIEW: (&str, &str) = ("preview_token", "cs_prod_preview");

#[test]
fn every_row_of_the_table() {
    let w = world();
    let get = Method::GET;
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("allowed delivery request", get.clone(), "cdn.test", "/v3/content_types", vec![SITE, PROD], Forward("blt_prod", SessionKind::Delivery)),
        ("row 1: unknown host", get.clone(), "nowhere.test", "/v3/x", vec![SITE, PROD], Refuse("no_route")),
        ("row 2: POST on delivery", Method::POST, "cdn.test", "/v3/x", vec![SITE, PROD], Refuse("method_not_allowed")),
        ("row 2: PUT on graphql", Method::PUT, "graphql.test", "/stacks/blt_site", vec![PROD], Refuse("method_not_allowed")),
        ("row 2: OPTIONS without preflight headers", Method::OPTIONS, "cdn.test", "/v3/x", vec![SITE, PROD], Refuse("method_not_allowed")),
        ("preflight", Method::OPTIONS, "cdn.test", "/v3/x", vec![("origin", "https://a.test"), ("access-control-request-method", "GET")], Preflight),
        ("row 3: access_token in query", get.clone(), "cdn.test", "/v3/x?access_token=cs_prod", vec![SITE, PROD], Refuse("credential_in_query")),
        ("row 3: api_key in query", get.clone(), "cdn.test", "/v3/x?api_key=blt_site", vec![SITE, PROD], Refuse("credential_in_query")),
        ("row 3: encoded and upper case", get.clone(), "cdn.test", "/v3/x?Preview%5Ftoken=x", vec![SITE, PROD], Refuse("credential_in_query")),
        ("row 3: authtoken in query", get.clone(), "cdn.test", "/v3/x?authtoken=x", vec![SITE, PROD], Refuse("credential_in_query")),
        ("row 3: authorization in query", get.clone(), "cdn.test", "/v3/x?authorization=x", vec![SITE, PROD], Refuse("credential_in_query")),
        ("row 4: authorization header", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("authorization", "Bearer x")], Refuse("management_credential")),
        ("row 4: authtoken header", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("authtoken", "x")], Refuse("management_credential")),
        ("row 5: no api_key", get.clone(), "cdn.test", "/v3/x", vec![PROD], Refuse("unknown_stack")),
        ("row 5: unknown api_key", get.clone(), "cdn.test", "/v3/x", vec![("api_key", "blt_nope"), PROD], Refuse("unknown_stack")),
        ("row 5: graphql without /stacks/", get.clone(), "graphql.test", "/graphql", vec![SITE, PROD], Refuse("unknown_stack")),
        ("row 6: never loaded", get.clone(), "cdn.test", "/v3/x", vec![("api_key", "blt_unloaded"), PROD], Refuse("registry_unavailable")),
        ("row 7: stale", get.clone(), "cdn.test", "/v3/x", vec![("api_key", "blt_stale"), PROD], Refuse("registry_stale")),
        ("row 8: preview_token alone on delivery", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD_PREVIEW], Refuse("preview_token_on_delivery")),
        ("row 8: preview value as access_token", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_prod_preview")], Refuse("preview_token_on_delivery")),
        ("row 8: revoked preview value as access_token", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_gone_preview")], Refuse("preview_token_on_delivery")),
        ("row 8: on graphql", get.clone(), "graphql.test", "/stacks/blt_site?environment=production", vec![PROD_PREVIEW], Refuse("preview_token_on_delivery")),
        ("row 9: deleted token", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_gone")], Refuse("token_revoked")),
        ("row 9: admin-revoked token", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_admin")], Refuse("token_revoked")),
        ("row 9: deleted preview token", get.clone(), "preview.test", "/v3/x", vec![SITE, ("preview_token", "cs_gone_preview")], Refuse("token_revoked")),
        ("row 9: admin-revoked on preview", get.clone(), "preview.test", "/v3/x", vec![SITE, ("preview_token", "cs_admin_preview")], Refuse("token_revoked")),
        ("row 10: no access_token", get.clone(), "cdn.test", "/v3/x", vec![SITE], Refuse("invalid_token")),
        ("row 10: unknown access_token", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_nope")], Refuse("invalid_token")),
        ("row 10: empty access_token", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "")], Refuse("invalid_token")),
        ("row 10: graphql unknown", Method::POST, "graphql.test", "/stacks/blt_site?environment=production", vec![("access_token", "x")], Refuse("invalid_token")),
        ("row 11: delivery token alone on preview", get.clone(), "preview.test", "/v3/x", vec![SITE, PROD], Refuse("invalid_preview_token")),
        ("row 11: unknown preview token", get.clone(), "preview.test", "/v3/x", vec![SITE, ("preview_token", "nope")], Refuse("invalid_preview_token")),
        ("row 11: delivery value as preview_token", get.clone(), "preview.test", "/v3/x", vec![SITE, ("preview_token", "cs_prod")], Refuse("invalid_preview_token")),
        ("row 12: tokens of different delivery tokens", get.clone(), "preview.test", "/v3/x", vec![SITE, ("access_token", "cs_other"), PROD_PREVIEW], Refuse("token_mismatch")),
        ("row 12: unknown access_token beside preview", get.clone(), "preview.test", "/v3/x", vec![SITE, ("access_token", "cs_nope"), PROD_PREVIEW], Refuse("token_mismatch")),
        ("row 13: other environment", get.clone(), "cdn.test", "/v3/x?environment=staging", vec![SITE, PROD], Refuse("environment_out_of_scope")),
        ("row 13: one of two environments out", get.clone(), "cdn.test", "/v3/x?environment=production&environment=staging", vec![SITE, PROD], Refuse("environment_out_of_scope")),
        ("row 13: environment by name", get.clone(), "cdn.test", "/v3/x?environment=production", vec![SITE, PROD], Forward("blt_prod", SessionKind::Delivery)),
        ("row 13: parameter name in any case", get.clone(), "cdn.test", "/v3/x?Environment=staging", vec![SITE, PROD], Refuse("environment_out_of_scope")),
        ("row 13: environment by uid", get.clone(), "cdn.test", "/v3/x?environment=env_prod", vec![SITE, PROD], Forward("blt_prod", SessionKind::Delivery)),
        ("row 14: branch out of scope", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("branch", "feature")], Refuse("branch_out_of_scope")),
        ("row 14: branch in list", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("branch", "development")], Forward("blt_prod", SessionKind::Delivery)),
        ("row 14: alias", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("branch", "deploy")], Forward("blt_prod", SessionKind::Delivery)),
        ("row 14: names compare exactly", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("branch", "Main")], Refuse("branch_out_of_scope")),
        ("row 14: no modules allows main by default", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_other")], Forward("blt_other", SessionKind::Delivery)),
        ("row 14: no modules refuses other branches", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_other"), ("branch", "development")], Refuse("branch_out_of_scope")),
        ("row 14: $all", get.clone(), "cdn.test", "/v3/x", vec![SITE, ("access_token", "cs_all"), ("branch", "anything")], Forward("blt_all", SessionKind::Delivery)),
        ("preview: both tokens of one delivery token (TypeScript SDK)", get.clone(), "preview.test", "/v3/x?environment=production&live_preview=hash", vec![SITE, PROD, PROD_PREVIEW], Forward("blt_prod", SessionKind::Preview)),
        ("preview: preview token alone (old JS SDK)", get.clone(), "preview.test", "/v3/x", vec![SITE, PROD_PREVIEW, ("live_preview", "hash")], Forward("blt_prod", SessionKind::Preview)),
        ("delivery: TS SDK sends preview_token along", get.clone(), "cdn.test", "/v3/x", vec![SITE, PROD, ("preview_token", "garbage")], Forward("blt_prod", SessionKind::Delivery)),
        ("graphql: api_key from path", Method::POST, "graphql.test", "/stacks/blt_site?environment=production", vec![PROD], Forward("blt_prod", SessionKind::Delivery)),
        ("graphql: api_key header ignored", get.clone(), "graphql.test", "/stacks/blt_nope", vec![SITE, PROD], Refuse("unknown_stack")),
        ("graphql preview", get.clone(), "gqlpreview.test", "/stacks/blt_site", vec![PROD_PREVIEW], Forward("blt_prod", SessionKind::Preview)),
        ("graphql preview with a delivery token only", get.clone(), "gqlpreview.test", "/stacks/blt_site", vec![PROD], Refuse("invalid_preview_token")),
    ];
    let mut failures = Vec::new();
    for (name, method, host, uri, headers, expect) in cases {
        let got = run(&w, method, host, uri, &headers);
        if got != expect {
            failures.push(format!("{name}: expected {expect:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn row_order_first_failure_decides() {
    let w = world();
    // Row 3 before row 4, 4 before 5, 2 before 3.
    let r = run(
        &w,
        Method::GET,
        "cdn.test",
        "/x?access_token=a",
        &[("authorization", "x")],
    );
    assert_eq!(r, Refuse("credential_in_query"));
    let r = run(&w, Method::GET, "cdn.test", "/x", &[("authorization", "x")]);
    assert_eq!(r, Refuse("management_credential"));
    let r = run(&w, Method::POST, "cdn.test", "/x?access_token=a", &[]);
    assert_eq!(r, Refuse("method_not_allowed"));
    // Row 9 before 13: a revoked token with a wrong environment.
    let r = run(
        &w,
        Method::GET,
        "cdn.test",
        "/x?environment=staging",
        &[SITE, ("access_token", "cs_gone")],
    );
    assert_eq!(r, Refuse("token_revoked"));
    // Row 13 before 14.
    let r = run(
        &w,
        Method::GET,
        "cdn.test",
        "/x?environment=staging",
        &[SITE, PROD, ("branch", "nope")],
    );
    assert_eq!(r, Refuse("environment_out_of_scope"));
}

#[test]
fn refusals_carry_the_token_uid_once_known() {
    let w = world();
    let (parts, ()) = Request::get("/x?environment=staging")
        .header("host", "cdn.test")
        .header("api_key", "blt_site")
        .header("access_token", "cs_prod")
        .body(())
        .unwrap()
        .into_parts();
    match w.decide(&parts, Instant::now()) {
        Decision::Refuse(r) => {
            assert_eq!(r.token.as_ref().map(|t| &*t.uid), Some("blt_prod"));
            assert_eq!(r.stack.map(|s| &*s.name), Some("website"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
}

#[test]
fn a_permit_carries_what_revocation_needs() {
    let w = world();
    let (parts, ()) = Request::get("/v3/entries?environment=env_prod")
        .header("host", "cdn.test")
        .header("api_key", "blt_site")
        .header("access_token", "cs_prod")
        .header("branch", "deploy")
        .body(())
        .unwrap()
        .into_parts();
    let Decision::Forward(permit) = w.decide(&parts, Instant::now()) else {
        panic!("expected a permit");
    };
    assert_eq!(permit.branch, "deploy");
    assert_eq!(permit.environments.as_slice(), ["env_prod"]);
    assert_eq!(permit.path, "/v3/entries");
    assert_eq!(permit.session, SessionKind::Delivery);
}

#[test]
fn row_16_http_checks() {
    let parts = |uri: &str, headers: &[(&str, &str)]| {
        let mut b = Request::get(uri).header("host", "cdn.test");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    };
    assert_eq!(check_http(&parts("/x", &[]), 10), Ok(()));
    let long = format!("/x?q={}", "a".repeat(MAX_URL_BYTES));
    assert_eq!(
        check_http(&parts(&long, &[]), 10),
        Err(BadRequest::UrlTooLong)
    );
    let big = "b".repeat(MAX_HEAD_BYTES);
    assert_eq!(
        check_http(&parts("/x", &[("x-big", &big)]), 10),
        Err(BadRequest::HeadTooLarge)
    );
    assert_eq!(
        check_http(
            &parts(
                "/x",
                &[("content-length", "5"), ("transfer-encoding", "chunked")]
            ),
            10
        ),
        Err(BadRequest::Malformed)
    );
    assert_eq!(
        check_http(&parts("/x", &[("content-length", "11")]), 10),
        Err(BadRequest::BodyTooLarge)
    );
    assert_eq!(
        check_http(&parts("/x", &[("content-length", "ten")]), 10),
        Err(BadRequest::Malformed)
    );
    assert_eq!(
        check_http(
            &parts("/x", &[("access_token", "a"), ("access_token", "b")]),
            10
        ),
        Err(BadRequest::Malformed)
    );
    // Hosts: one reading (SPEC §2).
    let with_version = |uri: &str, version: http::Version, headers: &[(&str, &str)]| {
        let mut b = Request::get(uri).version(version);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    };
    let h2 = http::Version::HTTP_2;
    let h1 = http::Version::HTTP_11;
    for (what, request, verdict) in [
        (
            "h2 with :authority",
            with_version("http://cdn.test/x", h2, &[]),
            Ok(()),
        ),
        (
            "h2 with host only",
            with_version("/x", h2, &[("host", "cdn.test")]),
            Ok(()),
        ),
        (
            "h2 with neither",
            with_version("/x", h2, &[]),
            Err(BadRequest::Malformed),
        ),
        (
            "h2 disagreeing",
            with_version("http://cdn.test/x", h2, &[("host", "b.test")]),
            Err(BadRequest::Malformed),
        ),
        (
            "h1 without Host",
            with_version("/x", h1, &[]),
            Err(BadRequest::Malformed),
        ),
        (
            "h1.0 without Host",
            with_version("/x", http::Version::HTTP_10, &[]),
            Ok(()),
        ),
        (
            "absolute-form agreeing",
            with_version("http://CDN.test/x", h1, &[("host", "cdn.test")]),
            Ok(()),
        ),
        (
            "absolute-form disagreeing",
            with_version("http://a.test/x", h1, &[("host", "cdn.test")]),
            Err(BadRequest::Malformed),
        ),
        (
            "userinfo",
            with_version("/x", h1, &[("host", "a@cdn.test")]),
            Err(BadRequest::Malformed),
        ),
        (
            "two hosts",
            with_version("/x", h1, &[("host", "cdn.test"), ("host", "cdn.test")]),
            Err(BadRequest::Malformed),
        ),
    ] {
        assert_eq!(check_http(&request, 10), verdict, "{what}");
    }
}

/// A revocation installed between a request's decision and its session's
/// registration (which the revocation's scan then misses) is caught by
/// [`recheck`], which decides the request again on the newer registry.
#[tokio::test]
async fn a_permit_is_decided_again_when_the_registry_moved() {
    let world = world();
    let (parts, ()) = Request::get("/v3/entries?environment=production")
        .header("host", "cdn.test")
        .header(SITE.0, SITE.1)
        .header(PROD.0, PROD.1)
        .body(())
        .unwrap()
        .into_parts();
    let now = Instant::now();
    let recheck = |permit: &Permit<'_, '_>| {
        recheck(
            &world.router,
            &world.stacks,
            &parts,
            permit,
            &DigestMemo::default(),
            now,
        )
        .map(|refusal| refusal.reject.reason())
    };
    let Decision::Forward(permit) = world.decide(&parts, now) else {
        panic!("blt_prod may read production");
    };
    assert_eq!(recheck(&permit), None, "nothing moved");

    let stack = world.stacks.by_api_key("blt_site").unwrap();
    stack.set_admin_revocation("blt_prod", true).unwrap();
    assert_eq!(recheck(&permit), Some("token_revoked"));

    // Lifted again: the newest registry allows it, so the permit holds.
    stack.set_admin_revocation("blt_prod", false).unwrap();
    assert_eq!(recheck(&permit), None);
}
