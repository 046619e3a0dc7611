//! Routes: which kind of Contentstack API a request is for, and where it goes.
//!
//! A request is matched by its host (port ignored, case-insensitive; exact
//! names first, then `*`) and, where a route sets one, by a path prefix that
//! ends on a segment boundary and is stripped before forwarding (SPEC §2).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Method;

/// The four kinds of API the gateway fronts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// The Content Delivery API (REST).
    Delivery,
    /// The Live Preview API (rest-preview).
    Preview,
    /// GraphQL over the delivery API.
    Graphql,
    /// GraphQL over the preview API.
    GraphqlPreview,
}

impl RouteKind {
    /// Every kind, for iterating metric label sets.
    pub const ALL: [RouteKind; 4] = [
        RouteKind::Delivery,
        RouteKind::Preview,
        RouteKind::Graphql,
        RouteKind::GraphqlPreview,
    ];

    /// The position of this kind in [`RouteKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in config files, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Delivery => "delivery",
            RouteKind::Preview => "preview",
            RouteKind::Graphql => "graphql",
            RouteKind::GraphqlPreview => "graphql_preview",
        }
    }

    /// Whether the route needs a preview token (and only works with one).
    pub fn is_preview(self) -> bool {
        matches!(self, RouteKind::Preview | RouteKind::GraphqlPreview)
    }

    /// Whether the stack's api_key comes from `/stacks/{api_key}` in the path.
    pub fn api_key_in_path(self) -> bool {
        matches!(self, RouteKind::Graphql | RouteKind::GraphqlPreview)
    }

    /// Whether `method` may be used on this kind of route.
    pub fn allows_method(self, method: &Method) -> bool {
        match self {
            RouteKind::Delivery | RouteKind::Preview => {
                method == Method::GET || method == Method::HEAD
            }
            RouteKind::Graphql | RouteKind::GraphqlPreview => {
                method == Method::GET || method == Method::POST || method == Method::HEAD
            }
        }
    }

    /// The `Allow` / `Access-Control-Allow-Methods` value for this kind.
    pub fn allowed_methods(self) -> &'static str {
        match self {
            RouteKind::Delivery | RouteKind::Preview => "GET, HEAD",
            RouteKind::Graphql | RouteKind::GraphqlPreview => "GET, POST, HEAD",
        }
    }
}

/// Where a route forwards to: scheme and authority of the upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port.
    pub authority: Authority,
}

/// CORS answers for preflights and rejections on one route.
#[derive(Debug, Clone)]
pub struct Cors {
    /// `None` allows any origin.
    pub allow_origins: Option<Vec<String>>,
    /// The `Access-Control-Allow-Headers` value.
    pub allow_headers: String,
    /// How long browsers may cache a preflight.
    pub max_age: Duration,
}

/// The headers Contentstack's SDKs send, allowed by default on preflights.
pub const DEFAULT_CORS_HEADERS: &[&str] = &[
    "api_key",
    "access_token",
    "preview_token",
    "branch",
    "live_preview",
    "preview_timestamp",
    "release_id",
    "include_applied_variants",
    "x-cs-variant-uid",
    "x-user-agent",
    "x-request-id",
    "content-type",
    "accept",
    "accept-language",
];

/// How long browsers may cache a preflight unless the route says otherwise.
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl Default for Cors {
    fn default() -> Self {
        Cors {
            allow_origins: None,
            allow_headers: DEFAULT_CORS_HEADERS.join(", "),
            max_age: DEFAULT_CORS_MAX_AGE,
        }
    }
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for a request from `origin`,
    /// or `None` when that origin is not allowed.
    pub fn allow_origin<'a>(&'a self, origin: &'a str) -> Option<&'a str> {
        match &self.allow_origins {
            None => Some("*"),
            Some(list) if list.iter().any(|o| o == "*") => Some("*"),
            Some(list) => list.iter().any(|o| o == origin).then_some(origin),
        }
    }
}

/// One validated `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the config file, for messages.
    pub index: usize,
    /// What API this route fronts.
    pub kind: RouteKind,
    /// Lower-case host names, `*` for any.
    pub hosts: Vec<String>,
    /// A prefix such as `/cda`, without a trailing slash.
    pub path_prefix: Option<String>,
    /// Where requests go.
    pub upstream: Upstream,
    /// Preflight and rejection CORS settings.
    pub cors: Cors,
}

/// Finds the route for a request's host and path.
#[derive(Debug, Default)]
pub struct Router {
    by_host: HashMap<String, Vec<Arc<Route>>, foldhash::fast::RandomState>,
    fallback: Vec<Arc<Route>>,
}

impl Router {
    /// Builds the lookup tables; routes with longer prefixes are tried first.
    pub fn new(routes: &[Arc<Route>]) -> Self {
        let mut router = Router::default();
        for route in routes {
            for host in &route.hosts {
                let list = if host == "*" {
                    &mut router.fallback
                } else {
                    router.by_host.entry(host.clone()).or_default()
                };
                list.push(Arc::clone(route));
            }
        }
        let longest_prefix_first =
            |a: &Arc<Route>, b: &Arc<Route>| prefix_len(b).cmp(&prefix_len(a));
        for list in router.by_host.values_mut() {
            list.sort_by(longest_prefix_first);
        }
        router.fallback.sort_by(longest_prefix_first);
        router
    }

    /// The route for `host` (a Host header or URI authority, port allowed)
    /// and `path`, with the path to forward (prefix stripped).
    pub fn find<'r, 'p>(
        &'r self,
        host: Option<&str>,
        path: &'p str,
    ) -> Option<(&'r Route, &'p str)> {
        let exact = host
            .map(normalize_host)
            .and_then(|name| self.by_host.get(name.as_ref()));
        exact
            .into_iter()
            .chain(std::iter::once(&self.fallback))
            .flat_map(|list| list.iter())
            .find_map(|route| strip(route, path).map(|rest| (route.as_ref(), rest)))
    }
}

fn prefix_len(route: &Arc<Route>) -> usize {
    route.path_prefix.as_deref().map_or(0, str::len)
}

/// `path` with the route's prefix removed, or `None` if the prefix doesn't match.
fn strip<'a>(route: &Route, path: &'a str) -> Option<&'a str> {
    let Some(prefix) = route.path_prefix.as_deref() else {
        return Some(path);
    };
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() {
        Some("/")
    } else if rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

/// Lower-cases a host and drops its port (`[::1]:8080` -> `[::1]`).
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(index: usize, hosts: &[&str], prefix: Option<&str>) -> Arc<Route> {
        Arc::new(Route {
            index,
            kind: RouteKind::Delivery,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path_prefix: prefix.map(str::to_owned),
            upstream: Upstream {
                scheme: Scheme::HTTPS,
                authority: Authority::from_static("cdn.contentstack.io"),
            },
            cors: Cors::default(),
        })
    }

    #[test]
    fn exact_host_beats_default_and_port_case_are_ignored() {
        let router = Router::new(&[route(0, &["*"], None), route(1, &["cdn.example.com"], None)]);
        let found = |host, path| router.find(host, path).map(|(r, p)| (r.index, p));
        assert_eq!(
            found(Some("CDN.Example.com:8443"), "/v3/x"),
            Some((1, "/v3/x"))
        );
        assert_eq!(
            found(Some("other.example.com"), "/v3/x"),
            Some((0, "/v3/x"))
        );
        assert_eq!(found(None, "/v3/x"), Some((0, "/v3/x")));
    }

    #[test]
    fn prefixes_match_on_segment_boundaries_and_are_stripped() {
        let router = Router::new(&[
            route(0, &["a.example"], Some("/cda")),
            route(1, &["a.example"], Some("/cda/preview")),
        ]);
        let found = |path| {
            router
                .find(Some("a.example"), path)
                .map(|(r, p)| (r.index, p))
        };
        assert_eq!(found("/cda/v3/entries"), Some((0, "/v3/entries")));
        assert_eq!(found("/cda"), Some((0, "/")));
        assert_eq!(found("/cda/preview/v3"), Some((1, "/v3")));
        assert_eq!(found("/cdax/v3"), None);
        assert_eq!(found("/v3"), None);
    }

    #[test]
    fn unmatched_exact_host_falls_back_to_default_routes() {
        let router = Router::new(&[
            route(0, &["a.example"], Some("/cda")),
            route(1, &["*"], None),
        ]);
        let found = |path| router.find(Some("a.example"), path).map(|(r, _)| r.index);
        assert_eq!(found("/cda/x"), Some(0));
        assert_eq!(found("/other"), Some(1));
        let none = Router::new(&[route(0, &["a.example"], None)]);
        assert!(none.find(Some("b.example"), "/").is_none());
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("Example.COM:80"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("plain"), "plain");
    }

    #[test]
    fn methods_per_kind() {
        assert!(RouteKind::Delivery.allows_method(&Method::GET));
        assert!(!RouteKind::Delivery.allows_method(&Method::POST));
        assert!(RouteKind::Graphql.allows_method(&Method::POST));
        assert!(!RouteKind::GraphqlPreview.allows_method(&Method::PUT));
    }
}
