//! Why a request is refused: one [`Reject`] per reason of SPEC §3, with
//! the reason string that logs, metrics and the `x-stackgate-reason` header
//! share. The decision, the rate limits and the upstream call all refuse
//! with it, and [`crate::response`] alone turns it into a response.

/// Why a request is refused. One variant per reason of SPEC §3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    NoRoute,
    MethodNotAllowed,
    CredentialInQuery {
        param: String,
    },
    ManagementCredential,
    UnknownStack,
    RegistryUnavailable,
    RegistryStale,
    PreviewTokenOnDelivery,
    TokenRevoked {
        field: &'static str,
    },
    InvalidToken,
    InvalidPreviewToken,
    TokenMismatch,
    EnvironmentOutOfScope,
    BranchOutOfScope {
        branch: String,
    },
    RateLimited {
        limit: u32,
        remaining: u32,
        retry_after_secs: u64,
    },
    BadRequest(BadRequest),
    UpstreamError,
    UpstreamTimeout,
    /// `upstream.max_connections` in use for longer than `connect_timeout`.
    UpstreamBusy,
}

/// The shapes of row 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// 431.
    HeadTooLarge,
    /// 414.
    UrlTooLong,
    /// 413.
    BodyTooLarge,
    /// 400; the connection is closed after answering.
    Malformed,
}

impl Reject {
    /// The reason, as sent in `x-stackgate-reason` and used in logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::NoRoute => "no_route",
            Reject::MethodNotAllowed => "method_not_allowed",
            Reject::CredentialInQuery { .. } => "credential_in_query",
            Reject::ManagementCredential => "management_credential",
            Reject::UnknownStack => "unknown_stack",
            Reject::RegistryUnavailable => "registry_unavailable",
            Reject::RegistryStale => "registry_stale",
            Reject::PreviewTokenOnDelivery => "preview_token_on_delivery",
            Reject::TokenRevoked { .. } => "token_revoked",
            Reject::InvalidToken => "invalid_token",
            Reject::InvalidPreviewToken => "invalid_preview_token",
            Reject::TokenMismatch => "token_mismatch",
            Reject::EnvironmentOutOfScope => "environment_out_of_scope",
            Reject::BranchOutOfScope { .. } => "branch_out_of_scope",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::BadRequest(_) => "bad_request",
            Reject::UpstreamError => "upstream_error",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::UpstreamBusy => "upstream_busy",
        }
    }

    /// Whether this is a failed authentication (rows 8 to 14), counted by
    /// the per-IP limiter.
    pub fn is_failed_auth(&self) -> bool {
        matches!(
            self,
            Reject::PreviewTokenOnDelivery
                | Reject::TokenRevoked { .. }
                | Reject::InvalidToken
                | Reject::InvalidPreviewToken
                | Reject::TokenMismatch
                | Reject::EnvironmentOutOfScope
                | Reject::BranchOutOfScope { .. }
        )
    }
}
