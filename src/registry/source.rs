//! Where a stack's token list comes from: the CMA, or a file in the same shape.
//!
//! A fetch either returns the whole list or fails; it never returns part of
//! one. Paging stops on a short page or when `count` is reached; a full page
//! that adds no new uid means the CMA is looping, which is a failure, not the
//! end of the list (ending there would drop every token after it).
//!
//! The CMA allows 10 GET/s per organization, shared with every other tool the
//! customer runs. Every page request of every stack takes a slot from one
//! [`CmaBudget`] ([`CMA_REQUESTS_PER_SECOND`]), and a 429's `Retry-After`
//! holds back every stack, so that the gateway never bursts the budget however
//! many stacks it serves.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, RETRY_AFTER, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::model::{Digest, Token};
use super::parse::{parse_token_list, ParseError};
use crate::config::{CmaAuth, Secret};
use crate::memory::offload;
use crate::upstream::HttpClient;

/// How often a tokens file is checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Tokens asked for per page (the CMA's maximum).
pub const PAGE_SIZE: usize = 100;
/// More pages than this means something is wrong (a million tokens).
pub const MAX_PAGES: usize = 10_000;
/// The longest one page may take, connect to last byte (shorter with a short
/// `sync_interval`: a page should not take longer than the interval).
pub const MAX_PAGE_TIMEOUT: Duration = Duration::from_secs(20);
/// The shortest page timeout.
pub const MIN_PAGE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest page body accepted.
pub const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;

/// CMA requests per second the gateway allows itself, across all stacks: half
/// of the organization's 10 GET/s, leaving the rest to other tools.
pub const CMA_REQUESTS_PER_SECOND: u32 = 5;
/// Spaces CMA requests: at most one per `1 / rate` seconds, none before a
/// `Retry-After` has passed.
///
/// In cluster mode the budget is also shared with the other nodes: each
/// request then takes a slot of a [`SharedBudget`] too (SPEC §10).
pub struct CmaBudget {
    spacing: Duration,
    next: Mutex<Option<Instant>>,
    shared: std::sync::OnceLock<Arc<dyn SharedBudget>>,
}

/// A budget shared beyond this process (the cluster's, in Redis).
pub trait SharedBudget: Send + Sync {
    /// Waits for one request's slot; gives up (and so lets the request go,
    /// within this node's own budget) when the slot cannot be had.
    fn take(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

impl std::fmt::Debug for CmaBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmaBudget")
            .field("spacing", &self.spacing)
            .field("shared", &self.shared.get().is_some())
            .finish()
    }
}

impl CmaBudget {
    /// A budget of `per_second` requests per second.
    pub fn new(per_second: u32) -> CmaBudget {
        CmaBudget {
            spacing: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(None),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// From now on every request also takes a slot of `shared` (once).
    pub fn share(&self, shared: Arc<dyn SharedBudget>) {
        let _ = self.shared.set(shared);
    }

    /// Waits for the next free slot and takes it.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.spacing);
            slot
        };
        tokio::time::sleep_until(slot).await;
        if let Some(shared) = self.shared.get() {
            shared.take().await;
        }
    }

    /// Takes no slot before `wait` from now (a 429's `Retry-After`).
    pub fn hold_off(&self, wait: Duration) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + wait;
        *next = Some(next.map_or(until, |n| n.max(until)));
    }
}

/// Why a fetch failed. Never contains a credential or a token value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("CMA unreachable: {0}")]
    Connect(String),
    #[error("CMA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("CMA refused the credential or api_key (HTTP {0}); check credential_env and api_key")]
    Credential(u16),
    #[error("CMA rate limit reached (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("CMA answered HTTP {0}")]
    Status(u16),
    #[error("CMA answer unreadable: {0}")]
    Body(String),
    #[error("token list refused: {0}")]
    Parse(#[from] ParseError),
    #[error("CMA pagination {0}")]
    Pagination(&'static str),
    #[error("tokens file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("registry build failed: {0}")]
    Internal(String),
}

impl SyncError {
    /// A short label for logs and for telling one kind of failure from the next.
    pub fn kind(&self) -> &'static str {
        match self {
            SyncError::Connect(_) => "connect",
            SyncError::Timeout(_) => "timeout",
            SyncError::Credential(_) => "credential",
            SyncError::RateLimited { .. } => "rate_limited",
            SyncError::Status(_) => "status",
            SyncError::Body(_) => "body",
            SyncError::Parse(_) => "parse",
            SyncError::Pagination(_) => "pagination",
            SyncError::File { .. } => "file",
            SyncError::Internal(_) => "internal",
        }
    }
}

/// What a fetch found.
pub enum Fetched {
    /// The complete current list.
    Tokens(Vec<Token>),
    /// The source has not changed since the last fetch (files only).
    Unchanged,
}

/// A stack's token source with what it remembers between fetches.
pub enum Source {
    Cma(Box<CmaClient>),
    File(FileSource),
}

impl Source {
    /// Fetches the whole list. `refresh` re-reads a file even if it has not
    /// changed (a held-back removal is confirmed, or forced, by its content).
    pub async fn fetch(&mut self, refresh: bool) -> Result<Fetched, SyncError> {
        match self {
            Source::Cma(cma) => cma.fetch_all().await.map(Fetched::Tokens),
            Source::File(file) => file.fetch(refresh).await,
        }
    }
}

/// Reads `GET /v3/stacks/delivery_tokens`.
pub struct CmaClient {
    pub http: HttpClient,
    pub base: Uri,
    pub api_key: String,
    pub auth: CmaAuth,
    pub credential: Secret,
    /// Shared by every stack: spaces page requests, honours `Retry-After`.
    pub budget: std::sync::Arc<CmaBudget>,
    /// How long one page may take.
    pub page_timeout: Duration,
}

impl CmaClient {
    /// All pages, or an error.
    pub async fn fetch_all(&self) -> Result<Vec<Token>, SyncError> {
        let mut tokens: Vec<Token> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_PAGES {
            self.budget.acquire().await;
            let page = tokio::time::timeout(self.page_timeout, self.page(tokens.len())).await;
            let body = match page {
                Err(_) => return Err(SyncError::Timeout(self.page_timeout)),
                Ok(Err(SyncError::RateLimited { retry_after })) => {
                    self.budget
                        .hold_off(retry_after.unwrap_or(Duration::from_secs(1)));
                    return Err(SyncError::RateLimited { retry_after });
                }
                Ok(result) => result?,
            };
            // Parsing hashes every value: off the runtime that serves requests.
            let page = offload(move || parse_token_list(&body))
                .await
                .map_err(|err| SyncError::Internal(err.to_string()))??;
            let full = page.tokens.len() >= PAGE_SIZE;
            let before = tokens.len();
            for token in page.tokens {
                if seen.insert(token.uid.clone()) {
                    tokens.push(token);
                }
            }
            let added = tokens.len() - before;
            if !full {
                return Ok(tokens);
            }
            if added == 0 {
                return Err(SyncError::Pagination(
                    "loops: a full page added no new token",
                ));
            }
            if page.count.is_some_and(|count| tokens.len() as u64 >= count) {
                return Ok(tokens);
            }
        }
        Err(SyncError::Pagination("did not end"))
    }

    async fn page(&self, skip: usize) -> Result<Bytes, SyncError> {
        let base = self.base.to_string();
        let url = format!(
            "{}/v3/stacks/delivery_tokens?skip={skip}&limit={PAGE_SIZE}&include_count=true",
            base.trim_end_matches('/')
        );
        let credential = HeaderValue::from_str(&match self.auth {
            CmaAuth::Authtoken => self.credential.expose().to_owned(),
            CmaAuth::Bearer => format!("Bearer {}", self.credential.expose()),
        })
        .map_err(|_| SyncError::Credential(0))?;
        let mut request = Request::get(url)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("stackgate/", env!("CARGO_PKG_VERSION")))
            .header("api_key", &self.api_key)
            .body(Full::new(Bytes::new()))
            .map_err(|err| SyncError::Connect(err.to_string()))?;
        let name = match self.auth {
            CmaAuth::Authtoken => http::HeaderName::from_static("authtoken"),
            CmaAuth::Bearer => AUTHORIZATION,
        };
        let mut credential = credential;
        credential.set_sensitive(true);
        request.headers_mut().insert(name, credential);

        let response = self
            .http
            .request(request)
            .await
            .map_err(|err| SyncError::Connect(describe_client_error(&err)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(match status {
                StatusCode::TOO_MANY_REQUESTS => SyncError::RateLimited {
                    retry_after: response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs),
                },
                StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::PRECONDITION_FAILED => SyncError::Credential(status.as_u16()),
                other => SyncError::Status(other.as_u16()),
            });
        }
        // The organization's budget is spent (by us or another tool): take
        // no CMA slot for the rest of this second.
        let spent = response
            .headers()
            .get("x-ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            == Some(0);
        if spent {
            self.budget.hold_off(Duration::from_secs(1));
        }
        Limited::new(response.into_body(), MAX_PAGE_BYTES)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|err| SyncError::Body(err.to_string()))
    }
}

/// The error chain of a client failure, without URLs (which carry no secret,
/// but keep log lines short).
fn describe_client_error(err: &hyper_util::client::legacy::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// A tokens file, re-read when its size, mtime or content changes.
pub struct FileSource {
    pub path: PathBuf,
    last: Option<(Option<SystemTime>, u64, Digest)>,
}

impl FileSource {
    /// A source that reads `path` on its first fetch.
    pub fn new(path: PathBuf) -> Self {
        FileSource { path, last: None }
    }

    async fn fetch(&mut self, refresh: bool) -> Result<Fetched, SyncError> {
        let error = |reason: String| SyncError::File {
            path: self.path.display().to_string(),
            reason,
        };
        let meta = tokio::fs::metadata(&self.path)
            .await
            .map_err(|e| error(e.to_string()))?;
        let stamp = (meta.modified().ok(), meta.len());
        if let Some((mtime, len, _)) = &self.last {
            if (*mtime, *len) == stamp && !refresh {
                return Ok(Fetched::Unchanged);
            }
        }
        // Reading, hashing and parsing a large file takes milliseconds per
        // 10k tokens: off the runtime that serves requests, on the thread
        // that builds registries (see `crate::memory`).
        let last = self.last.as_ref().map(|(_, _, d)| *d).filter(|_| !refresh);
        let path = self.path.clone();
        let (digest, parsed) = offload(move || {
            let body = std::fs::read(&path)?;
            let digest = Digest::of(&body);
            let parsed = (last != Some(digest)).then(|| parse_token_list(&body));
            Ok::<_, std::io::Error>((digest, parsed))
        })
        .await
        .map_err(|e| error(e.to_string()))?
        .map_err(|e| error(e.to_string()))?;
        let Some(parsed) = parsed else {
            self.last = Some((stamp.0, stamp.1, digest));
            return Ok(Fetched::Unchanged);
        };
        let page = parsed?;
        self.last = Some((stamp.0, stamp.1, digest));
        Ok(Fetched::Tokens(page.tokens))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_spaces_requests_across_callers() {
        let budget = Arc::new(CmaBudget::new(5));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let budget = Arc::clone(&budget);
            tasks.push(tokio::spawn(async move {
                budget.acquire().await;
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap() - start);
        }
        times.sort();
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(200), "{times:?}");
        }
        assert!(times[9] >= Duration::from_millis(1800));

        budget.hold_off(Duration::from_secs(30));
        let before = Instant::now();
        budget.acquire().await;
        assert!(Instant::now() - before >= Duration::from_secs(30));
    }

    /// Counts the slots taken from it.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl SharedBudget for Counting {
        fn take(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async {})
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_budget_is_spent_once_per_request() {
        let budget = CmaBudget::new(5);
        budget.acquire().await;
        let counting = Arc::new(Counting(std::sync::atomic::AtomicUsize::new(0)));
        budget.share(Arc::clone(&counting) as Arc<dyn SharedBudget>);
        for _ in 0..3 {
            budget.acquire().await;
        }
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
