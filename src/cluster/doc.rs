//! The registry document the poller publishes: what the snapshot holds
//! (digests, scopes, revoked digests), never a token value. Admin
//! revocations travel apart, in their own set, so that a revocation from
//! any node and a publication from the poller never overwrite each other.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::registry::model::{DigestMap, Registry, Revoked, Token};
use crate::registry::snapshot::{stored, StoredRevoked, StoredToken};

/// The document format this build writes and reads.
pub const FORMAT: u32 = 1;

/// A published registry, without its version (Redis holds that beside it)
/// and without admin revocations (their own set).
#[derive(Debug, Serialize, Deserialize)]
pub struct Doc {
    format: u32,
    /// Unix seconds of the poller's sync this came from.
    pub synced_at: u64,
    tokens: Vec<StoredToken>,
    revoked: Vec<StoredRevoked>,
}

/// Why a stored document could not be used (the node keeps what it has).
#[derive(Debug, thiserror::Error)]
#[error("registry document: {0}")]
pub struct DocError(String);

impl Doc {
    /// The document of `registry` as synced at `synced_at` (unix seconds).
    pub fn of(registry: &Registry, synced_at: u64) -> Doc {
        let (tokens, revoked) = stored(registry);
        Doc {
            format: FORMAT,
            synced_at,
            tokens,
            revoked,
        }
    }

    /// Parses a stored document.
    pub fn parse(text: &str) -> Result<Doc, DocError> {
        let doc: Doc = serde_json::from_str(text).map_err(|e| DocError(e.to_string()))?;
        if doc.format != FORMAT {
            return Err(DocError(format!(
                "format {} (expected {FORMAT})",
                doc.format
            )));
        }
        Ok(doc)
    }

    /// The JSON stored in Redis.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The tokens and revoked digests of the document.
    pub fn parts(&self) -> Result<(Vec<Token>, DigestMap<Revoked>), DocError> {
        let bad_digest = || DocError("bad digest".to_owned());
        let tokens = self
            .tokens
            .iter()
            .map(|t| t.to_token().ok_or_else(bad_digest))
            .collect::<Result<Vec<_>, DocError>>()?;
        let mut revoked = DigestMap::default();
        for r in &self.revoked {
            let (digest, entry) = r.to_entry().ok_or_else(bad_digest)?;
            revoked.insert(digest, entry);
        }
        Ok((tokens, revoked))
    }
}

/// The registry at `version` made of `tokens`, `revoked` and the cluster's
/// admin set, keeping what `previous` (the registry it replaces) holds of
/// its tokens: their allocations and their usage
/// ([`Registry::from_listing`]).
pub fn compose(
    version: u64,
    tokens: Vec<Token>,
    previous: Option<&Registry>,
    revoked: DigestMap<Revoked>,
    admin: &BTreeSet<String>,
) -> Registry {
    let admin = admin.iter().map(|u| Arc::from(u.as_str())).collect();
    Registry::from_listing(version, tokens, previous, revoked, admin)
}

/// Whether two registries hold the same tokens, revoked digests and admin
/// revocations (their versions aside).
pub fn same_content(a: &Registry, b: &Registry) -> bool {
    a.len() == b.len()
        && a.admin_revoked() == b.admin_revoked()
        && a.revoked().len() == b.revoked().len()
        && a.tokens()
            .all(|t| b.get(&t.uid).is_some_and(|o| **o == **t))
        && a.revoked().keys().all(|d| b.revoked().contains_key(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::diff::next;
    use crate::registry::model::tests::token;

    #[test]
    fn a_document_round_trips_digests_only() {
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
        let json = Doc::of(&reg, 6).to_json();
        for value in ["secret-a", "secret-b", "secret-p"] {
            assert!(!json.contains(value), "{value} in {json}");
        }
        let (tokens, revoked) = Doc::parse(&json).unwrap().parts().unwrap();
        let admin = BTreeSet::from(["a".to_owned()]);
        let back = compose(9, tokens.clone(), None, revoked.clone(), &admin);
        assert_eq!(back.get("a").unwrap().usage.requests(), 0);
        // Over the registry it replaces, a token keeps its usage.
        reg.get("a").unwrap().usage.refused();
        let over = compose(9, tokens, Some(&reg), revoked.clone(), &admin);
        assert_eq!(over.get("a").unwrap().usage.requests(), 1);
        assert!(same_content(&over, &back));
        assert_eq!(back.version(), 9);
        assert_eq!(back.len(), 1);
        assert!(back.is_admin_revoked("a"));
        assert!(!same_content(&back, &reg), "the admin set differs");
        let plain = compose(
            9,
            reg.tokens().map(|t| Token::clone(t)).collect(),
            None,
            reg.revoked().clone(),
            &BTreeSet::new(),
        );
        assert!(same_content(&plain, &reg));
        assert!(Doc::parse("{\"format\":2,\"synced_at\":0,\"tokens\":[],\"revoked\":[]}").is_err());
    }
}
