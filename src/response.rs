//! The one place that builds the gateway's own responses: a [`Reject`] as a
//! refusal (status, Contentstack error body, `x-stackgate-reason`, the
//! rate-limit and `Allow` headers, CORS for a browser), a CORS preflight,
//! and the admin listener's JSON, text and error answers. Bodies name the
//! field at fault but never echo a credential.

use bytes::Bytes;
use http::header::{self, HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::reject::{BadRequest, Reject};
use crate::route::Route;

/// The body type every response of the gateway has.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
/// Errors inside response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header naming why the gateway refused a request.
pub const REASON_HEADER: &str = "x-stackgate-reason";
/// Contentstack's message for a bad delivery or preview token.
pub const NOT_LOGGED_IN: &str = "You're not allowed in here unless you're logged in.";
/// Headers a browser may read on a refusal.
const EXPOSED_HEADERS: &str =
    "x-stackgate-reason, x-request-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining";

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Status, `error_code`, `error_message` and `errors` for a rejection.
fn describe(reject: &Reject) -> (StatusCode, u32, String, serde_json::Value) {
    use Reject::*;
    let invalid = |field: &str| json!({ field: ["is not valid."] });
    let (status, code, message, errors) = match reject {
        NoRoute => (
            StatusCode::MISDIRECTED_REQUEST,
            None,
            "This gateway serves no route for this host and path.".to_owned(),
            json!({ "host": ["is not served by this gateway."] }),
        ),
        MethodNotAllowed => (
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            "This method is not allowed on this route.".to_owned(),
            json!({ "method": ["is not allowed."] }),
        ),
        CredentialInQuery { param } => (
            StatusCode::BAD_REQUEST,
            None,
            "Credentials must be sent as headers, not in the query string.".to_owned(),
            json!({ param.as_str(): ["is not allowed in the query string."] }),
        ),
        ManagementCredential => (
            StatusCode::FORBIDDEN,
            None,
            "Management and user credentials are not accepted by this gateway.".to_owned(),
            json!({ "authorization": ["is not allowed."] }),
        ),
        UnknownStack => (
            StatusCode::PRECONDITION_FAILED,
            Some(109),
            "Api key is not valid.".to_owned(),
            invalid("api_key"),
        ),
        RegistryUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "The token registry for this stack has not loaded yet. Please retry shortly.".to_owned(),
            json!({}),
        ),
        RegistryStale => (
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "The token registry for this stack is out of date. Please retry shortly.".to_owned(),
            json!({}),
        ),
        PreviewTokenOnDelivery => (
            StatusCode::FORBIDDEN,
            None,
            "A preview token works on preview hosts only.".to_owned(),
            json!({ "preview_token": ["is not allowed on this host."] }),
        ),
        TokenRevoked { field } => (StatusCode::UNAUTHORIZED, Some(105), NOT_LOGGED_IN.to_owned(), invalid(field)),
        InvalidToken => (StatusCode::UNAUTHORIZED, Some(105), NOT_LOGGED_IN.to_owned(), invalid("access_token")),
        InvalidPreviewToken => (StatusCode::UNAUTHORIZED, Some(105), NOT_LOGGED_IN.to_owned(), invalid("preview_token")),
        TokenMismatch => (
            StatusCode::UNAUTHORIZED,
            Some(105),
            NOT_LOGGED_IN.to_owned(),
            json!({ "access_token": ["does not belong to the preview token."] }),
        ),
        EnvironmentOutOfScope => (
            StatusCode::FORBIDDEN,
            None,
            "Access denied. The token is not allowed on this environment.".to_owned(),
            invalid("environment"),
        ),
        BranchOutOfScope { branch } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(901),
            format!("Access denied. You have insufficient permissions to perform operation on this branch '{branch}'."),
            invalid("branch"),
        ),
        RateLimited { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            None,
            "Too many requests. Please retry after the time in Retry-After.".to_owned(),
            json!({}),
        ),
        BadRequest(kind) => {
            let (status, message) = match kind {
                self::BadRequest::HeadTooLarge => (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "The request head is larger than 16 KiB.",
                ),
                self::BadRequest::UrlTooLong => (StatusCode::URI_TOO_LONG, "The URL is longer than 8 KiB."),
                self::BadRequest::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "The request body is too large."),
                self::BadRequest::Malformed => (StatusCode::BAD_REQUEST, "The request is malformed."),
            };
            (status, None, message.to_owned(), json!({}))
        }
        UpstreamError => (
            StatusCode::BAD_GATEWAY,
            None,
            "The upstream could not be reached or failed to answer.".to_owned(),
            json!({}),
        ),
        UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            None,
            "The upstream did not answer in time.".to_owned(),
            json!({}),
        ),
        UpstreamBusy => (
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "Every connection to the upstream is in use. Try again shortly.".to_owned(),
            json!({}),
        ),
    };
    let code = code.unwrap_or(u32::from(status.as_u16()));
    (status, code, message, errors)
}

/// The status a rejection is answered with.
pub fn status_of(reject: &Reject) -> StatusCode {
    describe(reject).0
}

/// The JSON body of a rejection.
fn body_of(reject: &Reject) -> (StatusCode, Bytes) {
    let (status, code, message, errors) = describe(reject);
    let body = json!({
        "error_message": message,
        "error_code": code,
        "errors": errors,
    });
    (status, Bytes::from(body.to_string()))
}

/// How many rejections have a body with no dynamic part (see [`fixed_slot`]).
const FIXED_BODIES: usize = 21;

/// Where the body of a rejection whose body has no dynamic part is kept, so
/// that it is built once per reason rather than per refusal (a refused
/// client can send many). `None` for the bodies that name what the client
/// sent (a query parameter, a branch).
fn fixed_slot(reject: &Reject) -> Option<usize> {
    use Reject::*;
    Some(match reject {
        NoRoute => 0,
        MethodNotAllowed => 1,
        CredentialInQuery { .. } | BranchOutOfScope { .. } => return None,
        ManagementCredential => 2,
        UnknownStack => 3,
        RegistryUnavailable => 4,
        RegistryStale => 5,
        PreviewTokenOnDelivery => 6,
        TokenRevoked { field } => match *field {
            "access_token" => 7,
            "preview_token" => 8,
            _ => return None,
        },
        InvalidToken => 9,
        InvalidPreviewToken => 10,
        TokenMismatch => 11,
        EnvironmentOutOfScope => 12,
        // The limits go in headers; the body is the same for every one.
        RateLimited { .. } => 13,
        BadRequest(self::BadRequest::HeadTooLarge) => 14,
        BadRequest(self::BadRequest::UrlTooLong) => 15,
        BadRequest(self::BadRequest::BodyTooLarge) => 16,
        BadRequest(self::BadRequest::Malformed) => 17,
        UpstreamError => 18,
        UpstreamTimeout => 19,
        UpstreamBusy => 20,
    })
}

/// The status and body of a rejection: built once per reason where the body
/// has no dynamic part.
fn status_and_body(reject: &Reject) -> (StatusCode, Bytes) {
    static FIXED: [std::sync::OnceLock<(StatusCode, Bytes)>; FIXED_BODIES] =
        [const { std::sync::OnceLock::new() }; FIXED_BODIES];
    match fixed_slot(reject).and_then(|slot| FIXED.get(slot)) {
        Some(cell) => cell.get_or_init(|| body_of(reject)).clone(),
        None => body_of(reject),
    }
}

/// The response for a rejection.
pub fn rejection(reject: &Reject) -> Response<Body> {
    let (status, body) = status_and_body(reject);
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(REASON_HEADER, HeaderValue::from_static(reject.reason()));
    match reject {
        Reject::RateLimited {
            limit,
            remaining,
            retry_after_secs,
        } => {
            headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            headers.insert("x-ratelimit-limit", HeaderValue::from(*limit));
            headers.insert("x-ratelimit-remaining", HeaderValue::from(*remaining));
        }
        Reject::MethodNotAllowed => {}
        Reject::BadRequest(BadRequest::Malformed) => {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    response
}

/// The refusal a client gets on `route` (when one matched): [`rejection`]
/// plus `Allow` on a 405, and CORS headers when the request came from an
/// allowed browser `origin`.
pub fn refusal(
    reject: &Reject,
    route: Option<&Route>,
    origin: Option<&HeaderValue>,
) -> Response<Body> {
    let mut response = rejection(reject);
    let Some(route) = route else {
        return response;
    };
    let headers = response.headers_mut();
    let origin = origin.and_then(|o| o.to_str().ok());
    if let Some(allow) = origin.and_then(|o| allowed_origin(route, o)) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    if *reject == Reject::MethodNotAllowed {
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static(route.kind.allowed_methods()),
        );
    }
    response
}

/// The answer to a CORS preflight, from the route's settings.
pub fn preflight(route: &Route, origin: Option<&HeaderValue>) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    let origin = origin.and_then(|o| o.to_str().ok()).unwrap_or("");
    if let Some(allow) = allowed_origin(route, origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(route.kind.allowed_methods()),
        );
        if let Ok(allow_headers) = HeaderValue::from_str(&route.cors.allow_headers) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(route.cors.max_age.as_secs()),
        );
    }
    headers.insert(
        header::VARY,
        HeaderValue::from_static("origin, access-control-request-headers"),
    );
    response
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if
/// the route allows that origin.
fn allowed_origin(route: &Route, origin: &str) -> Option<HeaderValue> {
    let allow = route.cors.allow_origin(origin)?;
    HeaderValue::from_str(allow).ok()
}

/// An admin answer with a text body.
pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An admin answer with a JSON body.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text(status, "application/json", value.to_string())
}

/// An admin error, in the same body shape as a refusal.
pub fn admin_error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &json!({ "error_message": message, "error_code": status.as_u16(), "errors": {} }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn contentstack_shapes_for_the_coded_rows() {
        let r = rejection(&Reject::InvalidToken);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[REASON_HEADER], "invalid_token");
        let body = body_json(r).await;
        assert_eq!(body["error_code"], 105);
        assert_eq!(body["error_message"], NOT_LOGGED_IN);
        assert_eq!(body["errors"]["access_token"][0], "is not valid.");

        let body = body_json(rejection(&Reject::UnknownStack)).await;
        assert_eq!(body["error_code"], 109);
        assert_eq!(body["errors"]["api_key"][0], "is not valid.");

        let r = rejection(&Reject::BranchOutOfScope {
            branch: "dev".into(),
        });
        assert_eq!(r.status(), 422);
        let body = body_json(r).await;
        assert_eq!(body["error_code"], 901);
        assert_eq!(
            body["error_message"],
            "Access denied. You have insufficient permissions to perform operation on this branch 'dev'."
        );
    }

    #[test]
    fn bodies_built_once_per_reason_match_fresh_ones() {
        use crate::reject::BadRequest as Bad;
        let all = [
            Reject::NoRoute,
            Reject::MethodNotAllowed,
            Reject::CredentialInQuery {
                param: "access_token".into(),
            },
            Reject::ManagementCredential,
            Reject::UnknownStack,
            Reject::RegistryUnavailable,
            Reject::RegistryStale,
            Reject::PreviewTokenOnDelivery,
            Reject::TokenRevoked {
                field: "access_token",
            },
            Reject::TokenRevoked {
                field: "preview_token",
            },
            Reject::TokenRevoked { field: "other" },
            Reject::InvalidToken,
            Reject::InvalidPreviewToken,
            Reject::TokenMismatch,
            Reject::EnvironmentOutOfScope,
            Reject::BranchOutOfScope {
                branch: "dev".into(),
            },
            Reject::RateLimited {
                limit: 5,
                remaining: 0,
                retry_after_secs: 3,
            },
            Reject::RateLimited {
                limit: 9,
                remaining: 1,
                retry_after_secs: 1,
            },
            Reject::BadRequest(Bad::HeadTooLarge),
            Reject::BadRequest(Bad::UrlTooLong),
            Reject::BadRequest(Bad::BodyTooLarge),
            Reject::BadRequest(Bad::Malformed),
            Reject::UpstreamError,
            Reject::UpstreamTimeout,
            Reject::UpstreamBusy,
        ];
        let mut slots = std::collections::HashMap::new();
        for reject in &all {
            // Twice: the second answer comes from the cell the first filled.
            for _ in 0..2 {
                assert_eq!(status_and_body(reject), body_of(reject), "{reject:?}");
            }
            if let Some(slot) = fixed_slot(reject) {
                assert!(slot < FIXED_BODIES, "{reject:?}");
                // One slot, one body: rejections sharing a slot share a body.
                let body = body_of(reject);
                assert_eq!(slots.entry(slot).or_insert_with(|| body.clone()), &body);
            }
        }
        assert_eq!(slots.len(), FIXED_BODIES);
    }

    #[tokio::test]
    async fn uncoded_rows_use_the_status_as_code() {
        for (reject, status) in [
            (Reject::NoRoute, 421),
            (Reject::MethodNotAllowed, 405),
            (
                Reject::CredentialInQuery {
                    param: "api_key".into(),
                },
                400,
            ),
            (Reject::ManagementCredential, 403),
            (Reject::RegistryUnavailable, 503),
            (Reject::RegistryStale, 503),
            (Reject::PreviewTokenOnDelivery, 403),
            (Reject::EnvironmentOutOfScope, 403),
            (Reject::BadRequest(BadRequest::HeadTooLarge), 431),
            (Reject::BadRequest(BadRequest::UrlTooLong), 414),
            (Reject::BadRequest(BadRequest::BodyTooLarge), 413),
            (Reject::BadRequest(BadRequest::Malformed), 400),
            (Reject::UpstreamError, 502),
            (Reject::UpstreamTimeout, 504),
            (Reject::UpstreamBusy, 503),
        ] {
            let r = rejection(&reject);
            assert_eq!(r.status(), status, "{reject:?}");
            assert_eq!(r.headers()[REASON_HEADER], reject.reason());
            let body = body_json(r).await;
            assert_eq!(body["error_code"], status, "{reject:?}");
            assert!(body["error_message"].is_string());
            assert!(body["errors"].is_object());
        }
    }

    #[test]
    fn rate_limits_carry_their_headers() {
        let r = rejection(&Reject::RateLimited {
            limit: 200,
            remaining: 0,
            retry_after_secs: 2,
        });
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["x-ratelimit-limit"], "200");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    }
}
