//! One reading of a request (SPEC §2 and row 16 of §3).
//!
//! The gateway checks a request, then forwards a request rebuilt from what it
//! checked. For that to be safe, the gateway and any reasonable origin must
//! be unable to read the request two ways. This module holds the rules:
//!
//! - header names: a credential or scope header is checked and forwarded in
//!   its underscore spelling only (`access_token`); the hyphen spelling
//!   (`access-token`), which some servers treat as the same name, is refused;
//! - hosts: one `Host`, no userinfo, and an absolute-form target or h2
//!   `:authority` that agrees with it;
//! - `Connection` may not name a credential, scope, `Host` or forwarding
//!   header (that would have it stripped after it was checked);
//! - the query: pairs separated by `&` only (a `;` is refused), no
//!   `name[...]` or hyphen forms of credential and scope names (rows 3 and
//!   13 read them in any case), no `branch` (the gateway checks the `branch`
//!   header); what is forwarded is re-encoded from the parsed pairs
//!   ([`canonical_query`]);
//! - the path: dot-segments resolved and empty segments collapsed
//!   ([`normalize_path`]); an encoded slash or backslash, a NUL, or a path
//!   that climbs above the root is refused.
//!
//! Everything here is pure and allocation-free on the common path.

use std::borrow::Cow;

use http::header::{HeaderName, HeaderValue};

/// Header names of the credentials and scopes the gateway checks, in the one
/// spelling it accepts.
pub const CHECKED_HEADERS: [&str; 5] = [
    "api_key",
    "access_token",
    "preview_token",
    "branch",
    "environment",
];

/// Query names that are credentials (row 3 refuses them) or scopes.
const SCOPED_PARAMS: [&str; 7] = [
    "api_key",
    "access_token",
    "preview_token",
    "authtoken",
    "authorization",
    "environment",
    "branch",
];

/// Why a request has more than one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// A credential or scope name in a spelling the gateway does not check.
    Spelling,
    /// A `Connection` header naming a header the gateway checks or sets.
    ConnectionListed,
    /// Userinfo in a host, or a host that does not parse.
    BadHost,
    /// Two hosts that disagree (two `Host`s, or `Host` against the target).
    HostMismatch,
    /// No host at all.
    NoHost,
    /// A query a lenient server would split or name differently.
    Query,
    /// A path a lenient server would resolve differently.
    Path,
}

/// Whether `name` is a credential or scope header in a spelling other than
/// the one checked: the same name once `-` reads as `_`.
pub fn misspelled_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    CHECKED_HEADERS
        .iter()
        .any(|c| c.len() == name.len() && name != *c && same_but_dashes(name, c))
}

/// `a` equals `checked` (lower case, `_`) in any case and with `-` for `_`.
fn lenient_eq(a: &str, checked: &str) -> bool {
    a.len() == checked.len()
        && a.bytes()
            .zip(checked.bytes())
            .all(|(x, y)| x.to_ascii_lowercase() == y || (x == b'-' && y == b'_'))
}

/// `a` equals `checked` when every `-` of `a` is read as `_`.
fn same_but_dashes(a: &str, checked: &str) -> bool {
    a.len() == checked.len()
        && a.bytes()
            .zip(checked.bytes())
            .all(|(x, y)| x == y || (x == b'-' && y == b'_'))
}

/// Whether a `Connection` header value lists a header that must reach the
/// origin exactly as checked or set by the gateway.
pub fn connection_lists_protected(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return true;
    };
    text.split(',').any(|option| {
        let option = option.trim();
        CHECKED_HEADERS.iter().any(|c| lenient_eq(option, c))
            || ["host", "forwarded", "x-request-id"]
                .iter()
                .any(|name| option.eq_ignore_ascii_case(name))
            || option
                .get(..12)
                .is_some_and(|start| start.eq_ignore_ascii_case("x-forwarded-"))
    })
}

/// Checks a `Host` value or an authority: it must parse, and carry no
/// userinfo. Returns it for comparison.
pub fn check_host(value: &[u8]) -> Result<&str, Ambiguity> {
    // RFC 3986's `host [ ":" port ]`: reg-name characters (unreserved,
    // sub-delims, pct-encoded), IP literals in brackets, a port. No `@`
    // (userinfo), no `/`, `?`, `#` or blanks.
    let allowed = |b: &u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            )
    };
    if value.is_empty() || !value.iter().all(allowed) {
        return Err(Ambiguity::BadHost);
    }
    std::str::from_utf8(value).map_err(|_| Ambiguity::BadHost)
}

/// The `environment` values a request gives, query then header.
pub type Environments<'a> = smallvec::SmallVec<[Cow<'a, str>; 2]>;

/// What a query gives the decision: the first credential it carries (row 3)
/// and its `environment` values (row 13), read in the one pass that also
/// checks its shape.
#[derive(Debug, Default)]
pub struct QueryRead<'a> {
    /// The first credential name found, as row 3 names it.
    pub credential: Option<&'static str>,
    /// Every `environment` value, decoded, in order (one or two, nearly
    /// always: kept inline, no allocation).
    pub environments: Environments<'a>,
    /// The query is already what [`canonical_query`] makes of it, and is
    /// forwarded as it is.
    pub canonical: bool,
}

/// Reads a query: `&`-separated pairs only (a `;` is a second reading), no
/// bracketed or hyphen forms of credential and scope names, no `branch`
/// (the gateway checks the `branch` header). Names in another case are read
/// as the name (rows 3 and 13 decide on them).
pub fn read_query(query: &str) -> Result<QueryRead<'_>, Ambiguity> {
    let mut read = QueryRead {
        canonical: true,
        ..QueryRead::default()
    };
    let bytes = query.as_bytes();
    let mut start = 0;
    // The pairs `query.split('&')` yields, each read in one pass over its
    // bytes: where it ends, its first `=`, whether it needs decoding, and
    // whether it is canonical (see `is_canonical`).
    while start <= bytes.len() {
        let (mut end, mut equals, mut encoded) = (start, None, false);
        while let Some(&byte) = bytes.get(end) {
            // Nearly every byte is kept as it is: one table read for it. None
            // of the bytes matched below is.
            if !KEPT[usize::from(byte)] {
                match byte {
                    b'&' => break,
                    b';' => return Err(Ambiguity::Query),
                    b'=' if equals.is_none() => equals = Some(end),
                    b'%' | b'+' => encoded = true,
                    _ => read.canonical = false,
                }
            }
            end += 1;
        }
        read.canonical &= end > start && !encoded;
        let (pair, pair_start) = (&query[start..end], start);
        start = end + 1;
        let (key, value) = if encoded {
            let parsed = form_urlencoded::parse(pair.as_bytes()).next();
            parsed.unwrap_or_default()
        } else {
            match equals {
                Some(at) => (
                    Cow::Borrowed(&query[pair_start..at]),
                    Cow::Borrowed(&query[at + 1..end]),
                ),
                None => (Cow::Borrowed(pair), Cow::Borrowed("")),
            }
        };
        match scoped_name(&key)? {
            Some("environment") => read.environments.push(value),
            Some(name) if name != "branch" => {
                read.credential.get_or_insert(name);
            }
            _ => {}
        }
    }
    Ok(read)
}

/// Which credential or scope name a query key is, if any: `Err` for a
/// bracketed or hyphen form of one, or for `branch`.
fn scoped_name(key: &str) -> Result<Option<&'static str>, Ambiguity> {
    // Most keys are none of them, and their first byte tells.
    let first = key.as_bytes().first().map_or(0, u8::to_ascii_lowercase);
    if !SCOPED_PARAMS.iter().any(|p| p.as_bytes()[0] == first) {
        return Ok(None);
    }
    let base = key.split_once('[').map_or(key, |(base, _)| base);
    let Some(name) = SCOPED_PARAMS
        .iter()
        .find(|p| p.len() == base.len() && p.as_bytes()[0] == first && lenient_eq(base, p))
    else {
        return Ok(None);
    };
    if base.len() != key.len() || base.contains('-') || *name == "branch" {
        return Err(Ambiguity::Query);
    }
    Ok(Some(name))
}

/// [`read_query`], and every `environment` pair agreeing with the
/// `environment` header when there is one.
pub fn check_query(query: &str, environment: Option<&str>) -> Result<(), Ambiguity> {
    let read = read_query(query)?;
    match environment {
        Some(header) if read.environments.iter().any(|e| e != header) => Err(Ambiguity::Query),
        _ => Ok(()),
    }
}

/// `application/x-www-form-urlencoded` decoding of one key or value, as
/// `form_urlencoded::parse` decodes it: `+` is a space, `%XX` a byte, and
/// bytes that are not UTF-8 read as U+FFFD.
fn decode(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| {
            char::from(b)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The query to forward: re-encoded from its parsed pairs, so that what the
/// origin decodes is what the gateway decoded, whether the origin reads `+`
/// as a space (form encoding) or not: a space goes out as `%20`, a `+` as
/// `%2B`, and every byte outside the kept set (`KEPT`) percent-encoded. A
/// query already in that form (nearly all of them) is returned as it is.
pub fn canonical_query(query: &str) -> Cow<'_, str> {
    if is_canonical(query) {
        return Cow::Borrowed(query);
    }
    let mut out = String::with_capacity(query.len() + 8);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push('&');
        }
        let (key, value) = match pair.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (pair, None),
        };
        encode_into(&mut out, &decode(key));
        if let Some(value) = value {
            out.push('=');
            encode_into(&mut out, &decode(value));
        }
    }
    Cow::Owned(out)
}

/// Whether a query is already what [`canonical_query`] would make of it:
/// kept bytes only, at most one `=` per pair, no empty pair. One pass.
fn is_canonical(query: &str) -> bool {
    let (mut pair_len, mut equals) = (0usize, false);
    for &byte in query.as_bytes() {
        if KEPT[usize::from(byte)] {
            pair_len += 1;
        } else if byte == b'=' && !equals {
            (pair_len, equals) = (pair_len + 1, true);
        } else if byte == b'&' && pair_len > 0 {
            (pair_len, equals) = (0, false);
        } else {
            return false;
        }
    }
    pair_len > 0
}

/// Bytes a query keeps as they are: RFC 3986's unreserved characters and
/// the sub-delimiters and gen-delimiters that no parser splits on.
static KEPT: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b','
                    | b'/'
                    | b':'
                    | b'@'
                    | b'['
                    | b']'
            );
        byte += 1;
    }
    table
};

fn encode_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        if KEPT[usize::from(byte)] {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

/// The path with dot-segments resolved and empty segments collapsed
/// (a trailing slash is kept). `%2e` counts as a dot, since a lenient server
/// decodes it. Refuses a path that climbs above the root, an encoded slash
/// or backslash, a raw backslash, and an encoded NUL.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Ambiguity> {
    let bytes = path.as_bytes();
    // One pass: nothing encoded, no backslash or `;`, no `//` or `/.`.
    let simple = bytes.iter().enumerate().all(|(at, &b)| {
        !PATH_SPECIAL[usize::from(b)]
            || (b == b'/' && !matches!(bytes.get(at + 1), Some(b'/' | b'.')))
    });
    if simple || !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    if path.contains('\\') {
        return Err(Ambiguity::Path);
    }
    let lower = path.to_ascii_lowercase();
    // Encoded slashes and backslashes, NUL, and the overlong UTF-8 forms of
    // `.` and `/` (`%c0%ae`) that old decoders still honour.
    if ["%2f", "%5c", "%00", "%c0", "%c1"]
        .iter()
        .any(|bad| lower.contains(bad))
    {
        return Err(Ambiguity::Path);
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    let mut trailing = false;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        // `/..;x/` is `/../` to servers that strip path parameters (Tomcat).
        if let Some((bare, _parameters)) = segment.split_once(';') {
            if dot_segment(bare).is_some() {
                return Err(Ambiguity::Path);
            }
        }
        let dots = dot_segment(segment);
        match dots {
            Some(1) => trailing = last,
            Some(_) => {
                if kept.pop().is_none() {
                    return Err(Ambiguity::Path);
                }
                trailing = last;
            }
            None if segment.is_empty() => trailing = last,
            None => {
                kept.push(segment);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// Path bytes that need a second look: `%`, `\\`, `;` and `/`.
static PATH_SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'%' as usize] = true;
    table[b'\\' as usize] = true;
    table[b';' as usize] = true;
    table[b'/' as usize] = true;
    table
};

/// `Some(1)` for `.`, `Some(2)` for `..`, with `%2e` read as a dot.
fn dot_segment(segment: &str) -> Option<u8> {
    let mut rest = segment;
    let mut dots = 0u8;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            rest = after;
        } else if rest.len() >= 3 && rest.as_bytes()[..3].eq_ignore_ascii_case(b"%2e") {
            rest = &rest[3..];
        } else {
            return None;
        }
        dots += 1;
        if dots > 2 {
            return None;
        }
    }
    (dots > 0).then_some(dots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_dot_segments_and_collapse_slashes() {
        let ok = |p: &str| normalize_path(p).map(Cow::into_owned);
        assert_eq!(ok("/v3/entries"), Ok("/v3/entries".to_owned()));
        assert_eq!(ok("/v3//entries/"), Ok("/v3/entries/".to_owned()));
        assert_eq!(ok("/cda/../admin"), Ok("/admin".to_owned()));
        assert_eq!(ok("/cda//evil.test/x"), Ok("/cda/evil.test/x".to_owned()));
        assert_eq!(ok("/a/./b/%2e/c"), Ok("/a/b/c".to_owned()));
        assert_eq!(ok("/a/b/%2E%2e/c"), Ok("/a/c".to_owned()));
        assert_eq!(ok("/a/.."), Ok("/".to_owned()));
        assert_eq!(ok("/a/.hidden/..."), Ok("/a/.hidden/...".to_owned()));
        assert_eq!(ok("/a%20b"), Ok("/a%20b".to_owned()));
        assert_eq!(ok("/a;b/c"), Ok("/a;b/c".to_owned()));
        assert!(matches!(normalize_path("/v3/x"), Ok(Cow::Borrowed(_))));
        for bad in [
            "/..",
            "/a/../../b",
            "/%2e%2e/x",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a%00",
        ] {
            assert_eq!(normalize_path(bad), Err(Ambiguity::Path), "{bad}");
        }
    }

    #[test]
    fn queries_have_one_spelling() {
        for ok in [
            "environment=production",
            "locale=en-us&environment=production",
            "query=%7Bentries%7D",
            "access_token=x",
            "x[]=1",
            "Environment=staging",
            "Access_Token=x",
            "",
        ] {
            assert_eq!(check_query(ok, None), Ok(()), "{ok}");
        }
        for bad in [
            "environment[]=staging",
            "Environment[]=staging",
            "locale=en-us;environment=staging",
            "access-token=x",
            "%65nvironment%5B0%5D=staging",
            "branch=development",
            "api-key=x",
        ] {
            assert_eq!(check_query(bad, None), Err(Ambiguity::Query), "{bad}");
        }
    }

    #[test]
    fn an_environment_header_and_query_must_agree() {
        let both = |q| check_query(q, Some("production"));
        assert_eq!(both("environment=production"), Ok(()));
        assert_eq!(both("environment=product%69on"), Ok(()));
        assert_eq!(both("locale=en"), Ok(()));
        assert_eq!(both("environment=staging"), Err(Ambiguity::Query));
        assert_eq!(
            both("environment=production&environment=staging"),
            Err(Ambiguity::Query)
        );
    }

    #[test]
    fn decoding_reads_like_form_urlencoded() {
        for text in ["a+b", "%41%2b", "b=c", "%", "%4", "%zz", "%E2%82%AC", "%FF"] {
            let theirs = form_urlencoded::parse(format!("k={text}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned());
            assert_eq!(Some(decode(text).into_owned()), theirs, "{text}");
        }
    }

    #[test]
    fn reading_a_query_tells_whether_it_is_canonical() {
        // Every query of up to 4 bytes over the bytes that matter.
        let alphabet = b"a=&%+[ ;";
        let mut queries = vec![String::new()];
        for _ in 0..4 {
            let longer: Vec<String> = queries
                .iter()
                .flat_map(|q| {
                    alphabet
                        .iter()
                        .map(move |&b| format!("{q}{}", char::from(b)))
                })
                .collect();
            queries.extend(longer);
        }
        queries.extend(["include[]=author&locale=en-us", "a=1&&b", "a==1"].map(String::from));
        for query in &queries {
            if let Ok(read) = read_query(query) {
                assert_eq!(read.canonical, is_canonical(query), "{query:?}");
            }
        }
    }

    #[test]
    fn canonical_queries_reencode_what_was_parsed() {
        for plain in [
            "a=1&b=2",
            "include[]=author&locale=en-us",
            "flag",
            "q=a.b:c",
        ] {
            assert!(
                matches!(canonical_query(plain), Cow::Borrowed(_)),
                "{plain}"
            );
        }
        assert_eq!(canonical_query("a=%31&&b"), "a=1&b");
        assert_eq!(canonical_query("q=a+b&x=%7B%7D"), "q=a%20b&x=%7B%7D");
        assert_eq!(canonical_query("q=a%2Bb"), "q=a%2Bb");
        assert_eq!(canonical_query("a=b=c"), "a=b%3Dc");
        assert_eq!(canonical_query("e=%E2%82%AC"), "e=%E2%82%AC");
    }

    #[test]
    fn hyphen_spellings_of_checked_headers_are_misspelled() {
        let name = |s: &'static str| HeaderName::from_static(s);
        assert!(misspelled_header(&name("access-token")));
        assert!(misspelled_header(&name("api-key")));
        assert!(misspelled_header(&name("preview-token")));
        assert!(!misspelled_header(&name("access_token")));
        assert!(!misspelled_header(&name("x-api-key")));
        assert!(!misspelled_header(&name("content-type")));
    }

    #[test]
    fn connection_may_not_list_checked_headers() {
        let listed = |s: &'static str| connection_lists_protected(&HeaderValue::from_static(s));
        assert!(listed("branch"));
        assert!(listed("close, Access_Token"));
        assert!(listed("access-token"));
        assert!(listed("X-Forwarded-For"));
        assert!(listed("host"));
        assert!(!listed("keep-alive"));
        assert!(!listed("close"));
    }

    #[test]
    fn hosts_carry_no_userinfo() {
        assert_eq!(check_host(b"cdn.test:8080"), Ok("cdn.test:8080"));
        assert_eq!(
            check_host(b"cdn.test:1@preview.test"),
            Err(Ambiguity::BadHost)
        );
        assert_eq!(check_host(b""), Err(Ambiguity::BadHost));
        assert_eq!(check_host(b"a b"), Err(Ambiguity::BadHost));
    }
}
