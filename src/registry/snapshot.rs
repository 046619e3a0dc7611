//! The last good registry on disk, so that a restart with the CMA down still
//! serves (and still refuses what was revoked).
//!
//! The file holds digests, never token values. It is written to a temporary
//! file with mode 0600, synced, then renamed over the old one, so a reader
//! sees the old snapshot or the new one and nothing in between.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::model::{Digest, DigestMap, Registry, Revoked, Scope, Token, TokenKind, TokenUsage};

/// The snapshot format version this build writes and reads.
pub const FORMAT: u32 = 1;

/// Why a snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a stackgate snapshot ({reason})")]
    Format { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
struct File {
    format: u32,
    stack: String,
    version: u64,
    /// Unix seconds of the sync this registry came from.
    synced_at: u64,
    tokens: Vec<StoredToken>,
    #[serde(default)]
    revoked: Vec<StoredRevoked>,
    #[serde(default)]
    admin_revoked: Vec<String>,
}

/// A token as the snapshot and the cluster's registry document store it:
/// its digests, never a value.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredToken {
    uid: String,
    name: String,
    scope: Scope,
    delivery_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preview_sha256: Option<String>,
}

impl StoredToken {
    fn of(token: &Token) -> StoredToken {
        StoredToken {
            uid: token.uid.to_string(),
            name: token.name.clone(),
            scope: Scope::clone(&token.scope),
            delivery_sha256: token.delivery.to_hex(),
            preview_sha256: token.preview.map(|d| d.to_hex()),
        }
    }

    /// The token; `None` for a digest that is not 64 hex digits.
    pub fn to_token(&self) -> Option<Token> {
        Some(Token {
            uid: Arc::from(self.uid.as_str()),
            name: self.name.clone(),
            scope: Arc::new(self.scope.clone()),
            delivery: Digest::from_hex(&self.delivery_sha256)?,
            preview: match &self.preview_sha256 {
                Some(hex) => Some(Digest::from_hex(hex)?),
                None => None,
            },
            usage: TokenUsage::default(),
        })
    }
}

/// A revoked digest as the snapshot and the registry document store it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredRevoked {
    sha256: String,
    uid: String,
    kind: TokenKind,
    /// Unix seconds when the registry learned of it.
    pub at: u64,
}

impl StoredRevoked {
    /// The digest and what it was; `None` for a digest that is not 64 hex
    /// digits.
    pub fn to_entry(&self) -> Option<(Digest, Revoked)> {
        let revoked = Revoked {
            uid: Arc::from(self.uid.as_str()),
            kind: self.kind,
            at: self.at,
        };
        Some((Digest::from_hex(&self.sha256)?, revoked))
    }
}

/// `registry`'s tokens (by uid) and revoked digests (by digest), as stored.
pub fn stored(registry: &Registry) -> (Vec<StoredToken>, Vec<StoredRevoked>) {
    let mut tokens: Vec<StoredToken> = registry.tokens().map(|t| StoredToken::of(t)).collect();
    tokens.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut revoked: Vec<StoredRevoked> = registry
        .revoked()
        .iter()
        .map(|(digest, r)| StoredRevoked {
            sha256: digest.to_hex(),
            uid: r.uid.to_string(),
            kind: r.kind,
            at: r.at,
        })
        .collect();
    revoked.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    (tokens, revoked)
}

/// A registry read back from disk, with when it was last synced.
#[derive(Debug)]
pub struct Loaded {
    pub registry: Registry,
    pub synced_at: SystemTime,
}

/// Writes `registry` for `stack` to `path` atomically with mode 0600.
pub fn write(
    path: &Path,
    stack: &str,
    registry: &Registry,
    synced_at: SystemTime,
) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let (tokens, revoked) = stored(registry);
    let file = File {
        format: FORMAT,
        stack: stack.to_owned(),
        version: registry.version(),
        synced_at: unix_secs(synced_at),
        tokens,
        revoked,
        admin_revoked: registry
            .admin_revoked()
            .iter()
            .map(|u| u.to_string())
            .collect(),
    };
    let body = serde_json::to_vec(&file).map_err(|err| SnapshotError::Format {
        path: path.to_owned(),
        reason: err.to_string(),
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut out = options.open(&tmp)?;
        out.write_all(&body)?;
        out.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Syncs the directory holding `path`, so that a rename into it survives a crash.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Reads a snapshot written by [`fn@write`] for `stack`. `Ok(None)` if there is none.
pub fn read(path: &Path, stack: &str) -> Result<Option<Loaded>, SnapshotError> {
    let body = match std::fs::read(path) {
        Ok(body) => body,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    parse(&body, stack, SystemTime::now())
        .map(Some)
        .map_err(|reason| SnapshotError::Format {
            path: path.to_owned(),
            reason,
        })
}

/// The largest registry version a snapshot may hold: far beyond any real
/// count of changes, and exact in every JSON reader.
pub const MAX_VERSION: u64 = 1 << 53;
/// How far in the future a snapshot's times may be (clock skew between the
/// host that wrote it and this one).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

/// Parses a snapshot's bytes for `stack`, as read at `now`. A field out of
/// range (a version past [`MAX_VERSION`], a time past `now` plus
/// [`MAX_CLOCK_SKEW`]) rejects the whole file: the CMA decides then.
pub fn parse(body: &[u8], stack: &str, now: SystemTime) -> Result<Loaded, String> {
    let file: File = serde_json::from_slice(body)
        .map_err(|err| format!("line {} column {}", err.line(), err.column()))?;
    if file.format != FORMAT {
        return Err(format!("format {} (expected {FORMAT})", file.format));
    }
    if file.stack != stack {
        return Err(format!("written for stack {:?}", file.stack));
    }
    if file.version > MAX_VERSION {
        return Err(format!(
            "version {} out of range (at most {MAX_VERSION})",
            file.version
        ));
    }
    let latest = unix_secs(now).saturating_add(MAX_CLOCK_SKEW.as_secs());
    let synced_at = UNIX_EPOCH
        .checked_add(Duration::from_secs(file.synced_at))
        .filter(|_| file.synced_at <= latest)
        .ok_or_else(|| format!("synced_at {} is in the future", file.synced_at))?;
    let bad_digest = || "bad digest".to_owned();
    let tokens = file
        .tokens
        .iter()
        .map(|t| t.to_token().ok_or_else(bad_digest))
        .collect::<Result<Vec<_>, String>>()?;
    let mut revoked = DigestMap::default();
    for r in &file.revoked {
        if r.at > latest {
            return Err(format!("revoked at {} is in the future", r.at));
        }
        let (digest, entry) = r.to_entry().ok_or_else(bad_digest)?;
        revoked.insert(digest, entry);
    }
    let admin_revoked: BTreeSet<Arc<str>> = file.admin_revoked.into_iter().map(Arc::from).collect();
    Ok(Loaded {
        registry: Registry::from_parts(file.version, tokens, revoked, admin_revoked),
        synced_at,
    })
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds since `time`, for reports.
pub fn age_secs(time: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(time)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::diff::next;
    use crate::registry::model::tests::token;
    use crate::registry::model::Lookup;

    #[test]
    fn round_trips_without_values_and_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/website.json");
        let (reg, _) = next(
            &Registry::default(),
            vec![
                token("a", "secret-a", Some("secret-p")),
                token("b", "secret-b", None),
            ],
            5,
        )
        .unwrap();
        let (reg, _) = next(&reg, vec![token("a", "secret-a", Some("secret-p"))], 6).unwrap();
        let reg = reg.with_admin_revocation("a", true).unwrap();
        write(&path, "website", &reg, SystemTime::now()).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        for value in ["secret-a", "secret-b", "secret-p"] {
            assert!(!text.contains(value));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let loaded = read(&path, "website").unwrap().unwrap();
        assert_eq!(loaded.registry.version(), reg.version());
        assert_eq!(loaded.registry.len(), 1);
        assert!(loaded.registry.is_admin_revoked("a"));
        assert!(matches!(
            loaded.registry.lookup(&Digest::of(b"secret-b")),
            Lookup::Revoked(_)
        ));
        assert!(matches!(
            loaded.registry.lookup(&Digest::of(b"secret-a")),
            Lookup::Revoked(_)
        ));
        assert!(read(&path, "other").is_err());
        assert!(read(&dir.path().join("missing.json"), "website")
            .unwrap()
            .is_none());
    }

    #[test]
    fn out_of_range_fields_reject_the_whole_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let (reg, _) = next(&Registry::default(), vec![token("a", "v", None)], 5).unwrap();
        write(&path, "s", &reg, SystemTime::now()).unwrap();
        let good: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let now = SystemTime::now();
        assert!(parse(good.to_string().as_bytes(), "s", now).is_ok());
        let bad = |field: &str, value: serde_json::Value| {
            let mut file = good.clone();
            file[field] = value;
            parse(file.to_string().as_bytes(), "s", now).unwrap_err()
        };
        assert!(bad("synced_at", u64::MAX.into()).contains("synced_at"));
        assert!(bad("synced_at", (i64::MAX as u64).into()).contains("synced_at"));
        let tomorrow_and_more = unix_secs(now) + 2 * MAX_CLOCK_SKEW.as_secs();
        assert!(bad("synced_at", tomorrow_and_more.into()).contains("future"));
        assert!(bad("version", u64::MAX.into()).contains("version"));
        assert!(bad("version", (MAX_VERSION + 1).into()).contains("version"));
        let revoked = serde_json::json!([{
            "sha256": Digest::of(b"x").to_hex(), "uid": "x", "kind": "delivery", "at": u64::MAX
        }]);
        assert!(bad("revoked", revoked).contains("future"));
        assert!(bad("version", (-1).into()).contains("line"));
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_not_a_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, b"{\"format\":1").unwrap();
        assert!(matches!(
            read(&path, "s"),
            Err(SnapshotError::Format { .. })
        ));
    }
}
