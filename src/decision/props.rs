//! Property tests of the decision table.
//!
//! - [`decide`] and [`check_http`] never panic, whatever the request head.
//! - [`decide`] forwards only what every row of SPEC §3 allows. The oracle
//!   ([`must_refuse`]) recomputes each row from the request and a plain model
//!   of the registry (token values in the clear, scopes as lists), not from
//!   the registry's lookups or `decide`'s own helpers.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

use super::*;
use crate::registry::diff::next;
use crate::registry::{Digest, Environment, Registry, Scope, Token};
use crate::route::{Cors, Route, RouteKind, Upstream};

/// Cases per property: enough to reach every row, cheap enough for `cargo test`.
const CASES: u32 = 2_000;

// ---------------------------------------------------------------------------
// The model: what the registry holds, in the clear.

/// One delivery token as the oracle sees it.
#[derive(Debug)]
struct ModelToken {
    uid: &'static str,
    value: &'static str,
    preview: Option<&'static str>,
    /// (name, uid) of its environments.
    environments: &'static [(&'static str, &'static str)],
    branches: Option<&'static [&'static str]>,
    aliases: Option<&'static [&'static str]>,
    /// Listed once, gone now.
    deleted: bool,
    /// Revoked by the admin API.
    admin_revoked: bool,
}

impl ModelToken {
    fn live(&self) -> bool {
        !self.deleted && !self.admin_revoked
    }

    fn allows_environment(&self, env: &str) -> bool {
        self.environments
            .iter()
            .any(|(name, uid)| *name == env || *uid == env)
    }

    fn allows_branch(&self, branch: &str) -> bool {
        match (self.branches, self.aliases) {
            (None, None) => branch == "main",
            (b, a) => b
                .unwrap_or_default()
                .iter()
                .chain(a.unwrap_or_default())
                .any(|name| *name == "$all" || *name == branch),
        }
    }
}

#[derive(Debug)]
struct ModelStack {
    api_key: &'static str,
    /// `None`: the registry never loaded.
    tokens: Option<&'static [ModelToken]>,
    /// `false`: loaded, but older than `max_staleness`.
    fresh: bool,
}

const PROD: (&str, &str) = ("production", "env_prod");
const STAGING: (&str, &str) = ("staging", "env_staging");

const SITE_TOKENS: &[ModelToken] = &[
    ModelToken {
        uid: "blt_prod",
        value: "cs_prod",
        preview: Some("cs_prod_preview"),
        environments: &[PROD],
        branches: Some(&["main", "development"]),
        aliases: Some(&["deploy"]),
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_other",
        value: "cs_other",
        preview: Some("cs_other_preview"),
        environments: &[STAGING],
        branches: None,
        aliases: None,
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_all",
        value: "cs_all",
        preview: None,
        environments: &[PROD],
        branches: Some(&["$all"]),
        aliases: None,
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_alias_all",
        value: "cs_alias_all",
        preview: Some("cs_alias_all_preview"),
        environments: &[PROD, STAGING],
        branches: Some(&[]),
        aliases: Some(&["$all"]),
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_alias_only",
        value: "cs_alias_only",
        preview: Some("cs_alias_only_preview"),
        environments: &[STAGING],
        branches: None,
        aliases: Some(&["live"]),
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_nothing",
        value: "cs_nothing",
        preview: Some("cs_nothing_preview"),
        environments: &[],
        branches: Some(&[]),
        aliases: Some(&[]),
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_gone",
        value: "cs_gone",
        preview: Some("cs_gone_preview"),
        environments: &[PROD],
        branches: None,
        aliases: None,
        deleted: true,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_admin",
        value: "cs_admin",
        preview: Some("cs_admin_preview"),
        environments: &[PROD],
        branches: Some(&["$all"]),
        aliases: None,
        deleted: false,
        admin_revoked: true,
    },
];

const BLOG_TOKENS: &[ModelToken] = &[
    ModelToken {
        uid: "blt_blog",
        value: "cs_blog",
        preview: Some("cs_blog_preview"),
        environments: &[PROD],
        branches: Some(&["main"]),
        aliases: None,
        deleted: false,
        admin_revoked: false,
    },
    ModelToken {
        uid: "blt_blog_gone",
        value: "cs_blog_gone",
        preview: None,
        environments: &[PROD],
        branches: None,
        aliases: None,
        deleted: true,
        admin_revoked: false,
    },
];

const STACKS: &[ModelStack] = &[
    ModelStack {
        api_key: "blt_site",
        tokens: Some(SITE_TOKENS),
        fresh: true,
    },
    ModelStack {
        api_key: "blt_blog",
        tokens: Some(BLOG_TOKENS),
        fresh: true,
    },
    ModelStack {
        api_key: "blt_unloaded",
        tokens: None,
        fresh: true,
    },
    ModelStack {
        api_key: "blt_stale",
        tokens: Some(SITE_TOKENS),
        fresh: false,
    },
];

/// Hosts of the four routes; no fallback route, so other hosts never match.
const ROUTES: [(&str, RouteKind); 4] = [
    ("cdn.test", RouteKind::Delivery),
    ("preview.test", RouteKind::Preview),
    ("graphql.test", RouteKind::Graphql),
    ("gqlpreview.test", RouteKind::GraphqlPreview),
];

fn list(l: Option<&[&str]>) -> Option<Vec<String>> {
    l.map(|l| l.iter().map(|s| s.to_string()).collect())
}

fn to_token(t: &ModelToken) -> Token {
    Token {
        usage: Default::default(),
        uid: Arc::from(t.uid),
        name: t.uid.to_owned(),
        scope: Arc::new(Scope {
            environments: t
                .environments
                .iter()
                .map(|(name, uid)| Environment {
                    name: (*name).into(),
                    uid: (*uid).into(),
                })
                .collect(),
            branches: list(t.branches),
            aliases: list(t.aliases),
        }),
        delivery: Digest::of(t.value.as_bytes()),
        preview: t.preview.map(|p| Digest::of(p.as_bytes())),
    }
}

/// Builds the real registry the model describes: every token listed at
/// version 1, the deleted ones dropped at version 2, then admin revocations.
fn registry(tokens: &[ModelToken]) -> Registry {
    let all = tokens.iter().map(to_token).collect();
    let live = tokens.iter().filter(|t| !t.deleted).map(to_token).collect();
    let (first, _) = next(&Registry::default(), all, 0).unwrap();
    let (mut registry, _) = next(&first, live, 1).unwrap();
    for t in tokens.iter().filter(|t| t.admin_revoked) {
        registry = registry.with_admin_revocation(t.uid, true).unwrap();
    }
    registry
}

use super::tests::{settings, World};

fn world() -> World {
    let routes: Vec<Arc<Route>> = ROUTES
        .iter()
        .enumerate()
        .map(|(index, (host, kind))| {
            Arc::new(Route {
                index,
                kind: *kind,
                hosts: vec![(*host).to_owned()],
                path_prefix: None,
                upstream: Upstream {
                    scheme: Scheme::HTTPS,
                    authority: Authority::from_static("origin.invalid"),
                },
                cors: Cors::default(),
            })
        })
        .collect();
    let stacks = STACKS
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let staleness = if s.fresh {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(1)
            };
            Arc::new(match s.tokens {
                Some(tokens) => StackRegistry::with_registry(
                    index,
                    s.api_key,
                    s.api_key,
                    settings(staleness),
                    registry(tokens),
                ),
                None => StackRegistry::new(
                    index,
                    s.api_key,
                    s.api_key,
                    settings(staleness),
                    crate::registry::source::Source::File(
                        crate::registry::source::FileSource::new(PathBuf::new()),
                    ),
                ),
            })
        })
        .collect();
    World {
        router: Router::new(&routes),
        stacks: Stacks::new(stacks),
    }
}

/// Later than the stale stack's 1 ms, well inside the others' hour.
fn now() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

// ---------------------------------------------------------------------------
// The oracle.

/// Why the request must not be forwarded, if it must not; recomputed from the
/// request and the model alone.
fn must_refuse(parts: &Parts) -> Option<String> {
    // Row 1: the host, port and case aside, is one of the routes'.
    let host = match parts.uri.authority() {
        Some(a) => Some(a.as_str().to_owned()),
        None => parts
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
    };
    let Some(host) = host else {
        return Some("no host".into());
    };
    let name = match host.rfind(':') {
        Some(i) if !host.starts_with('[') => &host[..i],
        _ => &host[..],
    };
    let Some(&(_, kind)) = ROUTES.iter().find(|(h, _)| h.eq_ignore_ascii_case(name)) else {
        return Some(format!("host {host:?} has no route"));
    };
    // Row 2.
    let graphql = matches!(kind, RouteKind::Graphql | RouteKind::GraphqlPreview);
    let preview = matches!(kind, RouteKind::Preview | RouteKind::GraphqlPreview);
    let method_ok = parts.method == Method::GET
        || parts.method == Method::HEAD
        || (graphql && parts.method == Method::POST);
    if !method_ok {
        return Some(format!("{} on {kind:?}", parts.method));
    }
    // Row 3, and the environments for row 13.
    let mut environments = Vec::new();
    for (key, value) in form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
        let lower = key.to_ascii_lowercase();
        if [
            "api_key",
            "access_token",
            "preview_token",
            "authtoken",
            "authorization",
        ]
        .contains(&lower.as_str())
        {
            return Some(format!("{key} in the query"));
        }
        if key.eq_ignore_ascii_case("environment") {
            environments.push(value.into_owned());
        }
    }
    // Row 4.
    if parts.headers.contains_key("authorization") || parts.headers.contains_key("authtoken") {
        return Some("management credential".into());
    }
    // Row 5.
    let path = parts.uri.path();
    let stack = STACKS.iter().find(|s| {
        if graphql {
            let key = format!("/stacks/{}", s.api_key);
            path == key || path.starts_with(&format!("{key}/"))
        } else {
            parts
                .headers
                .get("api_key")
                .is_some_and(|v| v.as_bytes().trim_ascii() == s.api_key.as_bytes())
        }
    });
    let Some(stack) = stack else {
        return Some("no stack".into());
    };
    // Rows 6 and 7.
    let Some(tokens) = stack.tokens else {
        return Some("registry never loaded".into());
    };
    if !stack.fresh {
        return Some("registry stale".into());
    }
    // Rows 8 to 12.
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| v.as_bytes())
            .filter(|v| !v.iter().all(u8::is_ascii_whitespace))
    };
    let access = header("access_token");
    let token = if preview {
        let Some(value) = header("preview_token") else {
            return Some("no preview_token on a preview route".into());
        };
        let Some(token) = tokens
            .iter()
            .find(|t| t.preview.is_some_and(|p| p.as_bytes() == value))
        else {
            return Some("preview_token not in the registry".into());
        };
        if access.is_some_and(|a| a != token.value.as_bytes()) {
            return Some("access_token of another token beside preview_token".into());
        }
        token
    } else {
        let Some(value) = access else {
            return Some("no access_token".into());
        };
        let Some(token) = tokens.iter().find(|t| t.value.as_bytes() == value) else {
            return Some("access_token not a delivery token of the stack".into());
        };
        token
    };
    if !token.live() {
        return Some(format!("{} is revoked", token.uid));
    }
    // Row 13.
    if let Some(env) = environments.iter().find(|e| !token.allows_environment(e)) {
        return Some(format!("environment {env:?} out of {}'s scope", token.uid));
    }
    // Row 14.
    let branch = parts.headers.get("branch").map_or("main".to_owned(), |b| {
        String::from_utf8_lossy(b.as_bytes()).trim().to_owned()
    });
    if !token.allows_branch(&branch) {
        return Some(format!("branch {branch:?} out of {}'s scope", token.uid));
    }
    None
}

// ---------------------------------------------------------------------------
// Request heads.

/// A request head, or `None` when the generated pieces don't form one.
fn head(method: &str, uri: &str, headers: &[(String, Vec<u8>)]) -> Option<Parts> {
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let uri = Uri::try_from(uri).ok()?;
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

/// Characters URIs are made of, the awkward ones included.
fn uri_junk() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-z0-9_./-]{1,6}",
            1 => prop::sample::select(vec![
                "%", "%2", "%zz", "%00", "%5F", "%5f", "%2F", "%3D", "%26", "%C3%A9", "%E2%80%8B",
                "%FF", "\\u0000", "\\u00e9", "&", "=", "?", "#", "[", "]", "+", ";", ":", "@",
                "//", "..", "é", " ", "\t", "*", "!", "$", "'", "(", ")", ",", "~",
            ])
            .prop_map(str::to_owned),
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
            "TRACE", "get",
        ])
        .prop_map(str::to_owned),
        1 => "[A-Za-z!#$%&'*+.^_`|~0-9-]{0,12}",
        1 => ".{0,4}",
    ]
}

fn host() -> impl Strategy<Value = String> {
    let known = prop::sample::select(ROUTES.iter().map(|(h, _)| *h).collect::<Vec<_>>());
    prop_oneof![
        8 => (known.clone(), any::<bool>(), prop::option::of(0u32..70_000)).prop_map(
            |(h, upper, port)| {
                let h = if upper { h.to_ascii_uppercase() } else { h.to_owned() };
                match port {
                    Some(p) => format!("{h}:{p}"),
                    None => h,
                }
            }
        ),
        1 => Just(String::new()),
        1 => "[ -~]{0,24}",
        1 => known.prop_map(|h| format!("[{h}]:80")),
        1 => prop::sample::select(vec!["[::1]:8080", "[::1", "cdn.test:", ":443", "cdn.test.", "user@cdn.test"])
            .prop_map(str::to_owned),
    ]
}

/// Values a credential, api_key, branch or environment might hold.
fn value() -> impl Strategy<Value = String> {
    let mut real: Vec<&str> = Vec::new();
    for stack in STACKS {
        real.push(stack.api_key);
        for t in stack.tokens.unwrap_or_default() {
            real.push(t.value);
            real.extend(t.preview);
            real.push(t.uid);
        }
    }
    real.extend([
        "main",
        "development",
        "deploy",
        "live",
        "feature",
        "$all",
        "Main",
        "production",
        "env_prod",
        "staging",
        "env_staging",
        "",
        " ",
        "blt_nope",
        "Bearer x",
    ]);
    let real = prop::sample::select(real).prop_map(str::to_owned);
    prop_oneof![
        8 => real.clone(),
        1 => (real, prop::sample::select(vec![" ", "\t", "  "]), any::<bool>())
            .prop_map(|(v, pad, before)| if before { format!("{pad}{v}") } else { format!("{v}{pad}") }),
        1 => "[ -~]{0,16}",
    ]
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        10 => prop::sample::select(vec![
            "api_key", "access_token", "preview_token", "branch", "authorization",
            "authtoken", "environment", "host", "API_KEY", "Access_Token", "x-junk",
            "origin", "access-control-request-method", "content-length", "transfer-encoding",
        ])
        .prop_map(str::to_owned),
        1 => "[A-Za-z0-9_-]{0,12}",
        1 => ".{0,6}",
    ];
    let value = prop_oneof![
        10 => value().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ];
    (name, value)
}

/// A query string built from the parameters that matter, with junk between.
fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        6 => prop::sample::select(vec![
            "environment", "environment", "environment", "Environment", "env%69ronment",
            "api_key", "access_token", "preview_token", "authtoken", "authorization",
            "ACCESS_TOKEN", "Preview%5Ftoken", "access%5ftoken", "access+token", "live_preview", "q",
        ])
        .prop_map(str::to_owned),
        1 => uri_junk(),
    ];
    let val = prop_oneof![4 => value(), 1 => uri_junk()];
    let pair = (key, val, any::<bool>()).prop_map(|(k, v, eq)| {
        if eq {
            format!("{k}={}", v.replace(' ', "+"))
        } else {
            k
        }
    });
    prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&"))
}

fn path() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => prop::sample::select(STACKS.iter().map(|s| s.api_key).collect::<Vec<_>>())
            .prop_map(str::to_owned),
        1 => value(),
    ];
    prop_oneof![
        3 => (key, prop_oneof![Just(String::new()), Just("/".to_owned()), uri_junk()])
            .prop_map(|(k, rest)| format!("/stacks/{k}{rest}")),
        2 => uri_junk().prop_map(|p| format!("/v3/{p}")),
        1 => uri_junk(),
    ]
}

/// A request head from pieces likely to reach every row.
#[derive(Debug, Clone)]
struct Head {
    method: String,
    uri: String,
    headers: Vec<(String, Vec<u8>)>,
}

fn structured_head() -> impl Strategy<Value = Head> {
    let stack_key = prop_oneof![
        12 => Just("blt_site".to_owned()),
        6 => prop::sample::select(STACKS.iter().map(|s| s.api_key).collect::<Vec<_>>())
            .prop_map(str::to_owned),
        1 => value(),
    ];
    let all_tokens: Vec<&'static ModelToken> = STACKS
        .iter()
        .take(2)
        .flat_map(|s| s.tokens.unwrap_or_default())
        .collect();
    // (delivery value, preview value) of one token, or anything.
    let pair = |t: &ModelToken| (t.value.to_owned(), t.preview.unwrap_or(t.value).to_owned());
    let token = prop_oneof![
        8 => prop::sample::select(SITE_TOKENS.iter().take(5).collect::<Vec<_>>()).prop_map(pair),
        4 => prop::sample::select(all_tokens).prop_map(pair),
        1 => (value(), value()),
    ];
    let common_method = prop::sample::select(vec!["GET", "HEAD", "POST"]).prop_map(str::to_owned);
    (
        (
            prop_oneof![4 => common_method, 1 => method()],
            prop_oneof![6 => (0..ROUTES.len(), any::<bool>(), prop::option::of(1u16..)).prop_map(
                |(i, upper, port)| {
                    let h = ROUTES[i].0;
                    let h = if upper { h.to_ascii_uppercase() } else { h.to_owned() };
                    port.map_or(h.clone(), |p| format!("{h}:{p}"))
                }
            ), 1 => host()],
            any::<bool>(),
            prop::sample::select(vec!["http", "https"]),
        ),
        (
            stack_key,
            prop_oneof![4 => Just(String::new()), 1 => path()],
            prop::collection::vec(prop_oneof![4 => value(), 1 => uri_junk()], 0..2),
            prop::option::weighted(0.25, query()),
        ),
        (
            token,
            prop::sample::select(vec![
                (true, false),
                (true, true),
                (false, true),
                (false, false),
            ]),
            prop::option::weighted(0.3, value()),
            prop::option::weighted(0.1, (any::<bool>(), value())),
            prop::collection::vec(header(), 0..2),
        ),
    )
        .prop_map(
            |(
                (method, host, absolute, scheme),
                (key, path, environments, query),
                ((access, preview), (with_access, with_preview), branch, api_key_swap, extra),
            )| {
                let graphql_path = format!("/stacks/{key}");
                // The graphql routes read the path; REST routes the header.
                let path = if path.is_empty() {
                    if host.to_ascii_lowercase().starts_with("g") {
                        graphql_path
                    } else {
                        "/v3/content_types".to_owned()
                    }
                } else {
                    path
                };
                let mut query: Vec<String> = query.into_iter().collect();
                for env in environments {
                    query.push(format!("environment={}", env.replace(' ', "+")));
                }
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                let mut headers = vec![("api_key".to_owned(), key.into_bytes())];
                if let Some((first, other)) = api_key_swap {
                    let header = ("api_key".to_owned(), other.into_bytes());
                    if first {
                        headers.insert(0, header);
                    } else {
                        headers[0] = header;
                    }
                }
                if with_access {
                    headers.push(("access_token".to_owned(), access.into_bytes()));
                }
                if with_preview {
                    headers.push(("preview_token".to_owned(), preview.into_bytes()));
                }
                if let Some(branch) = branch {
                    headers.push(("branch".to_owned(), branch.into_bytes()));
                }
                headers.extend(extra);
                let uri = if absolute {
                    format!("{scheme}://{host}{path}{query}")
                } else {
                    headers.insert(0, ("host".to_owned(), host.into_bytes()));
                    format!("{path}{query}")
                };
                Head {
                    method,
                    uri,
                    headers,
                }
            },
        )
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: CASES,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

// ---------------------------------------------------------------------------
// The properties.

/// (a) and (c): neither function panics on any head `http` can represent,
/// however unlikely its pieces. 2,000 cases.
#[test]
fn decide_and_check_http_never_panic_on_junk() {
    let w = world();
    let strategy = (
        prop_oneof![4 => method(), 1 => ".{0,8}"],
        prop_oneof![
            4 => uri_junk(),
            4 => (host(), uri_junk()).prop_map(|(h, p)| format!("http://{h}/{p}")),
            1 => ".{0,40}",
        ],
        prop::collection::vec(
            (
                prop_oneof![header().prop_map(|h| h.0), "[!-~]{0,20}"],
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..40),
                    value().prop_map(String::into_bytes)
                ],
            ),
            0..10,
        ),
    );
    let parsed = Cell::new(0u32);
    runner()
        .run(&strategy, |(method, uri, headers)| {
            let Some(parts) = head(&method, &uri, &headers) else {
                return Ok(());
            };
            parsed.set(parsed.get() + 1);
            let _ = check_http(&parts, 0);
            let _ = check_http(&parts, u64::MAX);
            let _ = w.decide(&parts, now());
            Ok(())
        })
        .unwrap();
    eprintln!("{CASES} cases: {} heads parsed", parsed.get());
    assert!(
        parsed.get() > CASES / 8,
        "only {} heads parsed",
        parsed.get()
    );
}

/// (b): a head is forwarded only if every row allows it, as recomputed by
/// the oracle; a permit's contents agree with the request. 2,000 cases,
/// checked to reach forwards and refusals alike.
#[test]
fn forward_only_when_every_row_allows() {
    let w = world();
    let forwarded = Cell::new(0u32);
    let refused = Cell::new(0u32);
    runner()
        .run(&structured_head(), |h| {
            let Some(parts) = head(&h.method, &h.uri, &h.headers) else {
                return Ok(());
            };
            let _ = check_http(&parts, 1 << 20);
            match w.decide(&parts, now()) {
                Decision::Forward(permit) => {
                    forwarded.set(forwarded.get() + 1);
                    if let Some(why) = must_refuse(&parts) {
                        return Err(TestCaseError::fail(format!(
                            "forwarded but must refuse: {why}"
                        )));
                    }
                    check_permit(&permit, &parts)?;
                }
                Decision::Preflight(_) | Decision::Refuse(_) => {
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{CASES} cases: {} forwarded, {} refused",
        forwarded.get(),
        refused.get()
    );
    assert!(
        forwarded.get() >= CASES / 100,
        "only {} of {CASES} forwarded: the generator misses the allowed region",
        forwarded.get()
    );
    assert!(refused.get() >= CASES / 4, "only {} refused", refused.get());
}

/// A permit names the token the request presented, the route kind's session,
/// and the environments (query, then header) and branch it asked for.
fn check_permit(permit: &Permit<'_, '_>, parts: &Parts) -> Result<(), TestCaseError> {
    let preview = permit.route.kind.is_preview();
    let (header, wanted) = if preview {
        ("preview_token", TokenKind::Preview)
    } else {
        ("access_token", TokenKind::Delivery)
    };
    let presented = parts.headers.get(header).map(|v| v.as_bytes());
    let token = STACKS
        .iter()
        .filter_map(|s| s.tokens)
        .flatten()
        .find(|t| *t.uid == *permit.token.uid);
    let Some(token) = token else {
        return Err(TestCaseError::fail("permit for a token not in the model"));
    };
    let value = match wanted {
        TokenKind::Delivery => Some(token.value),
        TokenKind::Preview => token.preview,
    };
    prop_assert_eq!(presented, value.map(str::as_bytes));
    let session = if preview {
        SessionKind::Preview
    } else {
        SessionKind::Delivery
    };
    prop_assert_eq!(permit.session, session);
    // The query's `environment` values, then the `environment` header's
    // (which must agree with them, or the request is refused).
    let mut environments: Vec<String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .filter(|(k, _)| k.eq_ignore_ascii_case("environment"))
            .map(|(_, v)| v.into_owned())
            .collect();
    if let Some(value) = parts.headers.get("environment") {
        environments.push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    prop_assert_eq!(permit.environments.as_slice(), environments.as_slice());
    prop_assert!(token.allows_branch(&permit.branch));
    // The path forwarded is the request's, normalized (SPEC §2); no route of
    // this world has a prefix.
    let normal = crate::canonical::normalize_path(parts.uri.path());
    prop_assert_eq!(Ok(&*permit.path), normal.as_deref());
    Ok(())
}

/// (c) with the shapes row 16 looks at: lengths around the limits, repeated
/// credential headers, any `content-length`. Checks the verdicts too.
#[test]
fn check_http_never_panics_and_measures() {
    let strategy = (
        0usize..(MAX_URL_BYTES + 64),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "content-length",
                    "transfer-encoding",
                    "api_key",
                    "access_token",
                    "preview_token",
                    "branch",
                    "environment",
                    "host",
                    "authorization",
                    "authtoken",
                    "x-pad",
                ]),
                prop_oneof![
                    "[0-9]{0,22}",
                    "[ -~]{0,8}",
                    (0usize..4096).prop_map(|n| "p".repeat(n)),
                ],
            ),
            0..8,
        ),
        any::<u64>(),
    );
    runner()
        .run(&strategy, |(query_len, headers, max_body)| {
            let uri = format!("/x?q={}", "a".repeat(query_len));
            let mut builder = Request::get(uri.as_str());
            for (name, value) in &headers {
                builder = builder.header(*name, value.as_str());
            }
            let parts = builder.body(()).unwrap().into_parts().0;
            let verdict = check_http(&parts, max_body);
            // What the one pass reads is what `decide` reads on its own.
            let read = check_and_read(&parts, max_body);
            prop_assert_eq!(read.as_ref().map(|_| ()), verdict.as_ref().map(|_| ()));
            if let Ok(read) = read {
                prop_assert_eq!(read, HeadersRead::of(&parts.headers));
            }
            if uri.len() > MAX_URL_BYTES {
                prop_assert_eq!(verdict, Err(BadRequest::UrlTooLong));
            }
            if verdict.is_ok() {
                for name in ["content-length", "access_token", "preview_token", "branch"] {
                    prop_assert!(parts.headers.get_all(name).iter().count() <= 1);
                }
                if let Some(length) = parts.headers.get("content-length") {
                    let length: u64 = length.to_str().unwrap().trim().parse().unwrap();
                    prop_assert!(length <= max_body);
                }
            }
            Ok(())
        })
        .unwrap();
}

proptest! {
    /// The query is read exactly as `form_urlencoded` decodes it, so a
    /// credential hidden behind percent-encoding (`access%5Ftoken`) is still
    /// found by row 3, and every `environment` value reaches row 13; a query
    /// is refused (row 16) exactly when a lenient server could read it
    /// another way.
    #[test]
    fn queries_are_read_like_form_urlencoded(query in "([a-zA-Z_=&+.;\\[\\]-]|%[0-9A-Fa-f]{0,2}|[\\PC]){0,40}") {
        const CREDENTIALS: [&str; 5] =
            ["api_key", "access_token", "preview_token", "authtoken", "authorization"];
        let pairs: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
        let lenient = |key: &str| {
            let base = key.split('[').next().unwrap_or(key);
            (base.to_ascii_lowercase().replace('-', "_"), base.len() != key.len() || base.contains('-'))
        };
        let ambiguous = query.contains(';')
            || pairs.iter().any(|(key, _)| {
                let (name, odd) = lenient(key);
                (odd && (CREDENTIALS.contains(&name.as_str()) || name == "environment" || name == "branch"))
                    || name == "branch"
            });
        match crate::canonical::read_query(&query) {
            Err(_) => prop_assert!(ambiguous, "refused but unambiguous: {query:?}"),
            Ok(read) => {
                prop_assert!(!ambiguous, "read but ambiguous: {query:?}");
                let environments: Vec<_> = pairs
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case("environment"))
                    .map(|(_, v)| v.clone())
                    .collect();
                prop_assert_eq!(read.environments.as_slice(), environments.as_slice());
                let credential = pairs.iter().find_map(|(k, _)| {
                    CREDENTIALS.iter().copied().find(|c| k.eq_ignore_ascii_case(c))
                });
                prop_assert_eq!(read.credential, credential);
            }
        }
    }
}
