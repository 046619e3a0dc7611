//! The decision table of SPEC §3 as pure functions.
//!
//! [`check_http`] is row 16 (the HTTP layer's checks, before all others);
//! [`decide`] is rows 1 to 14 in order, the first failing row deciding. Both
//! read only their arguments: no `.await`, no clock, no metrics. Row 15 (rate
//! limits) and row 17 (upstream errors) happen after a decision, elsewhere,
//! but share the [`Reject`] type so that one function renders every refusal.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Version};
use tokio::time::Instant;

use crate::canonical::{self, Ambiguity};
use crate::registry::model::DEFAULT_BRANCH;
use crate::registry::{DigestMemo, Lookup, Presented, StackRegistry, Stacks, Token, TokenKind};
use crate::reject::{BadRequest, Reject};
use crate::route::{Route, Router};

/// Header carrying the stack's api_key on REST routes.
pub const API_KEY: HeaderName = HeaderName::from_static("api_key");
/// Header carrying the delivery token.
pub const ACCESS_TOKEN: HeaderName = HeaderName::from_static("access_token");
/// Header carrying the preview token.
pub const PREVIEW_TOKEN: HeaderName = HeaderName::from_static("preview_token");
/// Header carrying a branch or alias.
pub const BRANCH: HeaderName = HeaderName::from_static("branch");
/// Header some SDKs (Java, Android) carry the environment in.
pub const ENVIRONMENT: HeaderName = HeaderName::from_static("environment");
/// A user session token: never accepted at the edge.
pub const AUTHTOKEN: HeaderName = HeaderName::from_static("authtoken");

/// Largest request head accepted (row 16).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest URL accepted (row 16).
pub const MAX_URL_BYTES: usize = 8 * 1024;

/// Which kind of session a permitted request opens: a delivery token used on
/// a delivery or GraphQL route, or a preview token on a preview route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKind {
    Delivery,
    Preview,
}

/// A request that may be forwarded, with what revocation needs to know.
/// `'r` is the routes' and stacks' lifetime, `'p` the request's: what is
/// read from the request ends with `'p`, so that once the request is
/// rebuilt for the origin its head can be moved into that request.
#[derive(Debug)]
pub struct Permit<'r, 'p> {
    pub route: &'r Route,
    /// The path to forward: normalized, route prefix stripped.
    pub path: Cow<'p, str>,
    pub stack: &'r Arc<StackRegistry>,
    pub token: Arc<Token>,
    pub session: SessionKind,
    /// The `environment` values the request gave, query then header (all
    /// in scope).
    pub environments: canonical::Environments<'p>,
    /// The branch or alias it reads (`main` when none was given).
    pub branch: Cow<'p, str>,
    /// The request's `branch` header reads differently from `branch` (the
    /// check trimmed it): the origin is sent `branch` instead.
    pub branch_rewritten: bool,
    /// The version of the registry that decided it (see [`recheck`]).
    pub version: u64,
    /// The query is forwarded as it is (see [`canonical::canonical_query`]).
    pub query_canonical: bool,
}

/// A refused request, with what is known about it for logs and metrics.
#[derive(Debug)]
pub struct Refusal<'a> {
    pub reject: Reject,
    pub route: Option<&'a Route>,
    pub stack: Option<&'a Arc<StackRegistry>>,
    /// The token involved, once it is known (a listed one).
    pub token: Option<Arc<Token>>,
}

/// The outcome of [`decide`].
#[derive(Debug)]
pub enum Decision<'r, 'p> {
    Forward(Permit<'r, 'p>),
    /// A CORS preflight, answered by the gateway.
    Preflight(&'r Route),
    Refuse(Refusal<'r>),
}

/// Row 16: the HTTP layer's checks, before anything else is looked at.
/// Hyper already answers heads it cannot parse (or that overflow its buffer);
/// this catches what it lets through, and every request the gateway and an
/// origin could read two ways ([`crate::canonical`]).
pub fn check_http(parts: &Parts, max_body_bytes: u64) -> Result<(), BadRequest> {
    check_and_read(parts, max_body_bytes).map(|_| ())
}

/// [`check_http`], giving back what [`decide`] reads of the headers, found
/// in the same pass over them: for [`decide_read`].
pub fn check_and_read(parts: &Parts, max_body_bytes: u64) -> Result<HeadersRead<'_>, BadRequest> {
    let url_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if url_len > MAX_URL_BYTES {
        return Err(BadRequest::UrlTooLong);
    }
    // One pass over the headers: the head's size, the headers that must
    // appear at most once (and the values of those read below), and the
    // spellings and `Connection` options that would give a second reading.
    let mut head = url_len;
    let mut read = HeadersRead::default();
    let mut length_value = None;
    // One of the headers a request may carry at most once came again.
    let mut repeated = false;
    let mut transfer_encoding = false;
    let mut ambiguous = false;
    for (name, value) in &parts.headers {
        let name_text = name.as_str();
        head += name_text.len() + value.len() + 4;
        // The names `HeadersRead::of` reads, matched here in the same
        // `match` as row 16's own (one dispatch per header on the hot path;
        // `check_http_never_panics_and_measures` checks both read the same).
        let slot = match name_text {
            "content-length" => &mut length_value,
            "host" => &mut read.host,
            "environment" => &mut read.environment,
            "api_key" => &mut read.api_key,
            "access_token" => &mut read.access_token,
            "preview_token" => &mut read.preview_token,
            "branch" => &mut read.branch,
            "transfer-encoding" => {
                transfer_encoding = true;
                continue;
            }
            "connection" => {
                ambiguous |= canonical::connection_lists_protected(value);
                continue;
            }
            "authorization" | "authtoken" => {
                read.management = true;
                continue;
            }
            _ => {
                ambiguous |= canonical::misspelled_header(name);
                continue;
            }
        };
        repeated |= slot.is_some();
        slot.get_or_insert(value);
    }
    if head > MAX_HEAD_BYTES {
        return Err(BadRequest::HeadTooLarge);
    }
    if ambiguous || (transfer_encoding && length_value.is_some()) || repeated {
        return Err(BadRequest::Malformed);
    }
    let length = match length_value {
        None => 0,
        Some(length) => length
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(BadRequest::Malformed)?,
    };
    if length > max_body_bytes {
        return Err(BadRequest::BodyTooLarge);
    }
    // No body on GET or HEAD: a second request or a form could hide in it.
    let bodiless = parts.method == Method::GET || parts.method == Method::HEAD;
    if bodiless && (transfer_encoding || length > 0) {
        return Err(BadRequest::Malformed);
    }
    check_hosts(parts, read.host).map_err(|_| BadRequest::Malformed)?;
    // The query's rules are read with the query itself, in `decide`.
    Ok(read)
}

/// One host: a `Host` without userinfo that the target's authority (an
/// absolute-form target, or h2's `:authority`) agrees with; none missing
/// where HTTP/1.1 or h2 requires one.
fn check_hosts(parts: &Parts, host: Option<&HeaderValue>) -> Result<(), Ambiguity> {
    let host = host.map(|h| canonical::check_host(h.as_bytes()));
    let target = parts
        .uri
        .authority()
        .map(|a| canonical::check_host(a.as_str().as_bytes()));
    match (host.transpose()?, target.transpose()?) {
        (Some(host), Some(target)) if !host.eq_ignore_ascii_case(target) => {
            Err(Ambiguity::HostMismatch)
        }
        (None, None) if parts.version == Version::HTTP_2 => Err(Ambiguity::NoHost),
        (None, _) if parts.version == Version::HTTP_11 => Err(Ambiguity::NoHost),
        _ => Ok(()),
    }
}

/// Rows 1 to 14 of SPEC §3, in order.
pub fn decide<'r, 'p>(
    router: &'r Router,
    stacks: &'r Stacks,
    parts: &'p Parts,
    digests: &DigestMemo,
    now: Instant,
) -> Decision<'r, 'p> {
    let headers = HeadersRead::of(&parts.headers);
    decide_read(router, stacks, parts, headers, digests, now)
}

/// [`decide`], with the headers as [`check_and_read`] read them from `parts`.
pub fn decide_read<'r, 'p>(
    router: &'r Router,
    stacks: &'r Stacks,
    parts: &'p Parts,
    headers: HeadersRead<'p>,
    digests: &DigestMemo,
    now: Instant,
) -> Decision<'r, 'p> {
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.host.and_then(|h| h.to_str().ok()));
    // Row 16's query rules, read in the one pass rows 3 and 13 need.
    let environment_header = headers.environment;
    let query = match read_query(parts.uri.query(), environment_header) {
        Ok(query) => query,
        Err(_) => return refuse(Reject::BadRequest(BadRequest::Malformed), None, None, None),
    };
    // Row 16's path rules need the routes: see `find_route`.
    let (route, path) = match find_route(router, host, parts.uri.path()) {
        Ok(Some(found)) => found,
        // Row 1.
        Ok(None) => return refuse(Reject::NoRoute, None, None, None),
        Err(route) => return refuse(Reject::BadRequest(BadRequest::Malformed), route, None, None),
    };
    let refuse_here = |reject| refuse(reject, Some(route), None, None);
    if is_preflight(parts) {
        return Decision::Preflight(route);
    }
    // Row 2.
    if !route.kind.allows_method(&parts.method) {
        return refuse_here(Reject::MethodNotAllowed);
    }
    // Row 3.
    if let Some(param) = query.credential {
        return refuse_here(Reject::CredentialInQuery {
            param: param.to_owned(),
        });
    }
    // Row 13's values: the query's (any case: whether Contentstack would
    // read `Environment` is not ours to guess, and a refusal is the safe side
    // of that doubt), and the `environment` header some SDKs send.
    let mut environments = query.environments;
    if let Some(value) = environment_header {
        environments.push(String::from_utf8_lossy(value.as_bytes()));
    }
    // Row 4.
    if headers.management {
        return refuse_here(Reject::ManagementCredential);
    }
    // Row 5.
    let api_key = if route.kind.api_key_in_path() {
        api_key_from_path(&path)
    } else {
        headers.api_key.and_then(|v| v.to_str().ok())
    };
    let Some(stack) = api_key.and_then(|key| stacks.by_api_key(key.trim())) else {
        return refuse_here(Reject::UnknownStack);
    };
    let refuse_stack = |reject, token: Option<&Arc<Token>>| {
        refuse(reject, Some(route), Some(stack), token.map(Arc::clone))
    };
    // Rows 6 and 7.
    let view = stack.load();
    let Some(view) = view.as_ref() else {
        return refuse_stack(Reject::RegistryUnavailable, None);
    };
    if view.fresh_until.is_some_and(|until| now >= until) {
        return refuse_stack(Reject::RegistryStale, None);
    }
    let registry = &view.registry;
    let access = credential(headers.access_token);
    let preview = credential(headers.preview_token);
    let lookup = |field, value: &[u8]| registry.lookup(&digests.digest(field, value));
    let preview_lookup = || preview.map(|value| lookup(Presented::PreviewToken, value));
    let access_lookup = || access.map(|value| lookup(Presented::AccessToken, value));

    let (token, session) = if route.kind.is_preview() {
        let by_preview = preview_lookup();
        let by_access = access_lookup();
        // Row 9.
        if matches!(by_preview, Some(Lookup::Revoked(_))) {
            return refuse_stack(
                Reject::TokenRevoked {
                    field: "preview_token",
                },
                None,
            );
        }
        if matches!(by_access, Some(Lookup::Revoked(_))) {
            return refuse_stack(
                Reject::TokenRevoked {
                    field: "access_token",
                },
                None,
            );
        }
        // Row 11: only a preview token's value will do.
        let Some(Lookup::Live(token, TokenKind::Preview)) = by_preview else {
            return refuse_stack(Reject::InvalidPreviewToken, None);
        };
        // Row 12: an access_token beside it must be its own delivery token.
        if let Some(by_access) = by_access {
            let own =
                matches!(by_access, Lookup::Live(t, TokenKind::Delivery) if t.uid == token.uid);
            if !own {
                return refuse_stack(Reject::TokenMismatch, Some(token));
            }
        }
        (token, SessionKind::Preview)
    } else {
        // Row 8 (a preview_token beside an access_token plays no part).
        let by_access = access_lookup();
        let preview_value = matches!(
            by_access,
            Some(Lookup::Live(_, TokenKind::Preview) | Lookup::Revoked(TokenKind::Preview))
        );
        if (access.is_none() && preview.is_some()) || preview_value {
            return refuse_stack(Reject::PreviewTokenOnDelivery, None);
        }
        match by_access {
            // Row 9.
            Some(Lookup::Revoked(_)) => {
                return refuse_stack(
                    Reject::TokenRevoked {
                        field: "access_token",
                    },
                    None,
                );
            }
            Some(Lookup::Live(token, TokenKind::Delivery)) => (token, SessionKind::Delivery),
            // Row 10.
            _ => return refuse_stack(Reject::InvalidToken, None),
        }
    };
    // Row 13.
    if environments
        .iter()
        .any(|env| !token.scope.allows_environment(env))
    {
        return refuse_stack(Reject::EnvironmentOutOfScope, Some(token));
    }
    // Row 14.
    let branch = match headers.branch {
        None => Cow::Borrowed(DEFAULT_BRANCH),
        Some(value) => match String::from_utf8_lossy(value.as_bytes()) {
            Cow::Borrowed(text) => Cow::Borrowed(text.trim()),
            Cow::Owned(text) => Cow::Owned(text.trim().to_owned()),
        },
    };
    let branch_rewritten = headers
        .branch
        .is_some_and(|value| value.as_bytes() != branch.as_bytes());
    if !token.scope.allows_branch(&branch) {
        return refuse_stack(
            Reject::BranchOutOfScope {
                branch: branch.into_owned(),
            },
            Some(token),
        );
    }
    Decision::Forward(Permit {
        route,
        path,
        stack,
        token: Arc::clone(token),
        session,
        environments,
        branch,
        branch_rewritten,
        version: registry.version(),
        query_canonical: query.canonical,
    })
}

/// The route for `host` and `path`, and the path to forward: normalized
/// ([`canonical::normalize_path`]), its route prefix stripped. `Ok(None)`:
/// no route (row 1). `Err` (row 16): the path cannot be normalized, or the
/// raw and the normalized path would be read differently: matched to
/// different routes where either has a prefix (`/cda/../admin`), or naming
/// different stacks on GraphQL (`/stacks/a/../b`).
fn find_route<'r, 'p>(
    router: &'r Router,
    host: Option<&str>,
    raw: &'p str,
) -> Result<Option<(&'r Route, Cow<'p, str>)>, Option<&'r Route>> {
    let normal = canonical::normalize_path(raw).map_err(|_| None)?;
    let normal = match normal {
        Cow::Borrowed(path) => {
            return Ok(router
                .find(host, path)
                .map(|(route, rest)| (route, Cow::Borrowed(rest))))
        }
        Cow::Owned(normal) => normal,
    };
    let read_raw = router.find(host, raw);
    let Some((route, rest)) = router.find(host, &normal) else {
        let climbed = read_raw.filter(|(r, _)| r.path_prefix.is_some());
        return match climbed {
            Some((route, _)) => Err(Some(route)),
            None => Ok(None),
        };
    };
    let same_route = read_raw.is_some_and(|(r, _)| std::ptr::eq(r, route));
    let prefixed =
        route.path_prefix.is_some() || read_raw.is_some_and(|(r, _)| r.path_prefix.is_some());
    if prefixed && !same_route {
        return Err(Some(route));
    }
    if route.kind.api_key_in_path() {
        let raw_key = read_raw.and_then(|(_, raw_rest)| api_key_from_path(raw_rest));
        if raw_key != api_key_from_path(rest) {
            return Err(Some(route));
        }
    }
    Ok(Some((route, Cow::Owned(rest.to_owned()))))
}

/// Whether a permit still holds once its session is registered.
///
/// A revocation installs the new registry, then ends the sessions it finds.
/// A request decided on the old registry whose session registers after that
/// scan is not found by it. So, its session registered, a request checks
/// whether the registry moved since its decision, and if so is decided again
/// on the new one: either the scan saw the session or this sees the new
/// registry. The usual case costs one version read.
pub fn recheck<'r>(
    router: &'r Router,
    stacks: &'r Stacks,
    parts: &Parts,
    permit: &Permit<'_, '_>,
    digests: &DigestMemo,
    now: Instant,
) -> Option<Refusal<'r>> {
    let current = permit.stack.load().as_ref().map(|v| v.registry.version());
    if current == Some(permit.version) {
        return None;
    }
    match decide(router, stacks, parts, digests, now) {
        Decision::Refuse(refusal) => Some(refusal),
        Decision::Forward(_) | Decision::Preflight(_) => None,
    }
}

fn refuse<'r, 'p>(
    reject: Reject,
    route: Option<&'r Route>,
    stack: Option<&'r Arc<StackRegistry>>,
    token: Option<Arc<Token>>,
) -> Decision<'r, 'p> {
    Decision::Refuse(Refusal {
        reject,
        route,
        stack,
        token,
    })
}

/// The query read for rows 3, 13 and 16; with an `environment` header, every
/// `environment` pair must agree with it (one reading).
fn read_query<'q>(
    query: Option<&'q str>,
    header: Option<&HeaderValue>,
) -> Result<canonical::QueryRead<'q>, Ambiguity> {
    let Some(query) = query else {
        return Ok(canonical::QueryRead::default());
    };
    let read = canonical::read_query(query)?;
    if let Some(header) = header {
        if read
            .environments
            .iter()
            .any(|e| e.as_bytes() != header.as_bytes())
        {
            return Err(Ambiguity::Query);
        }
    }
    Ok(read)
}

/// A CORS preflight: OPTIONS with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(parts: &Parts) -> bool {
    parts.method == http::Method::OPTIONS
        && parts.headers.contains_key(http::header::ORIGIN)
        && parts
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// A credential header's value; an empty one counts as absent.
fn credential(value: Option<&HeaderValue>) -> Option<&[u8]> {
    value
        .map(HeaderValue::as_bytes)
        .filter(|v| !v.iter().all(u8::is_ascii_whitespace))
}

/// The headers [`decide`] reads, each as `HeaderMap::get` would give it
/// (the first value), found in one pass over the map rather than a hashed
/// lookup per name.
#[derive(Debug, Default, PartialEq)]
pub struct HeadersRead<'h> {
    host: Option<&'h HeaderValue>,
    environment: Option<&'h HeaderValue>,
    api_key: Option<&'h HeaderValue>,
    access_token: Option<&'h HeaderValue>,
    preview_token: Option<&'h HeaderValue>,
    branch: Option<&'h HeaderValue>,
    /// An `Authorization` or `authtoken` header is present (row 4).
    management: bool,
}

impl<'h> HeadersRead<'h> {
    fn of(headers: &'h HeaderMap) -> HeadersRead<'h> {
        let mut read = HeadersRead::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                "host" => &mut read.host,
                "environment" => &mut read.environment,
                "api_key" => &mut read.api_key,
                "access_token" => &mut read.access_token,
                "preview_token" => &mut read.preview_token,
                "branch" => &mut read.branch,
                "authorization" | "authtoken" => {
                    read.management = true;
                    continue;
                }
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        read
    }
}

/// `blt123` from `/stacks/blt123` or `/stacks/blt123/...`.
fn api_key_from_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/stacks/")?;
    let key = rest.split(['/', '?']).next()?;
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod props;
#[cfg(test)]
pub(crate) mod tests;
