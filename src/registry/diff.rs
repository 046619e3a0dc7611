//! What a registry change did, token by token, and the registry version a
//! sync produces ([`next`]).
//!
//! The diff is computed before the new registry is swapped in, and it is what
//! revocation acts on: `removed` and `rotated` end every session of a token,
//! `preview_removed` ends its preview sessions, `narrowed` ends the sessions
//! that the new scope no longer covers.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use super::model::{
    DigestMap, Registry, Revoked, Token, TokenKind, REVOKED_MEMORY_MAX, REVOKED_MEMORY_SECS,
};

/// Token uids, sorted, by what happened to them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Newly listed.
    pub added: Vec<String>,
    /// No longer listed: deleted.
    pub removed: Vec<String>,
    /// Still listed, but the preview token was deleted or replaced.
    pub preview_removed: Vec<String>,
    /// Still listed, but the delivery token value changed.
    pub rotated: Vec<String>,
    /// Still listed with a scope that no longer covers the old one.
    pub narrowed: Vec<String>,
    /// Other edits that end nothing: a new name, a wider scope, a new preview token.
    pub changed: Vec<String>,
}

impl Diff {
    /// Compares the registry's tokens with a freshly listed set.
    pub fn between(old: &Registry, new: &[Token]) -> Diff {
        let mut diff = Diff::default();
        let mut seen = HashSet::with_capacity(new.len());
        for token in new {
            seen.insert(&*token.uid);
            let uid = token.uid.to_string();
            let Some(before) = old.get(&token.uid) else {
                diff.added.push(uid);
                continue;
            };
            if **before == *token {
                continue;
            }
            if before.delivery != token.delivery {
                diff.rotated.push(uid);
                continue;
            }
            let preview_gone = before.preview.is_some() && before.preview != token.preview;
            let narrowed = !token.scope.covers(&before.scope);
            if preview_gone {
                diff.preview_removed.push(uid.clone());
            }
            if narrowed {
                diff.narrowed.push(uid.clone());
            }
            if !preview_gone && !narrowed {
                diff.changed.push(uid);
            }
        }
        diff.removed = old
            .tokens()
            .filter(|t| !seen.contains(&*t.uid))
            .map(|t| t.uid.to_string())
            .collect();
        for list in [
            &mut diff.added,
            &mut diff.removed,
            &mut diff.preview_removed,
            &mut diff.rotated,
            &mut diff.narrowed,
            &mut diff.changed,
        ] {
            list.sort_unstable();
        }
        diff
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.preview_removed.is_empty()
            && self.rotated.is_empty()
            && self.narrowed.is_empty()
            && self.changed.is_empty()
    }
}

/// The registry after a sync listed `tokens`, and what changed. Digests
/// that stop being valid are remembered as revoked; `now` is unix seconds.
/// Returns `None` when nothing changed.
pub fn next(old: &Registry, tokens: Vec<Token>, now: u64) -> Option<(Registry, Diff)> {
    let diff = Diff::between(old, &tokens);
    if diff.is_empty() {
        return None;
    }
    let mut revoked = old.revoked().clone();
    let listed: DigestMap<()> = tokens
        .iter()
        .flat_map(|t| std::iter::once(t.delivery).chain(t.preview))
        .map(|d| (d, ()))
        .collect();
    for gone in old.tokens() {
        let values = [
            (Some(gone.delivery), TokenKind::Delivery),
            (gone.preview, TokenKind::Preview),
        ];
        for (digest, kind) in values {
            if let Some(digest) = digest.filter(|d| !listed.contains_key(d)) {
                let uid = Arc::clone(&gone.uid);
                revoked.insert(digest, Revoked { uid, kind, at: now });
            }
        }
    }
    revoked.retain(|digest, _| !listed.contains_key(digest));
    prune_revoked(&mut revoked, now);
    let next = Registry::from_listing(
        old.version().saturating_add(1),
        tokens,
        Some(old),
        revoked,
        old.admin_revoked().clone(),
    );
    Some((next, diff))
}

/// Forgets revoked digests past [`REVOKED_MEMORY_SECS`], then the oldest past
/// [`REVOKED_MEMORY_MAX`].
fn prune_revoked(revoked: &mut DigestMap<Revoked>, now: u64) {
    revoked.retain(|_, r| now.saturating_sub(r.at) < REVOKED_MEMORY_SECS);
    if revoked.len() > REVOKED_MEMORY_MAX {
        let mut ages: Vec<u64> = revoked.values().map(|r| r.at).collect();
        ages.sort_unstable();
        let cutoff = ages[ages.len() - REVOKED_MEMORY_MAX];
        revoked.retain(|_, r| r.at >= cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::model::tests::token as listed;
    use crate::registry::model::{Digest, Lookup, Scope};

    fn token(uid: &str, value: &str, preview: Option<&str>, branches: Option<&[&str]>) -> Token {
        Token {
            usage: Default::default(),
            uid: Arc::from(uid),
            name: uid.to_owned(),
            scope: Arc::new(Scope {
                environments: vec![],
                branches: branches.map(|b| b.iter().map(|s| s.to_string()).collect()),
                aliases: None,
            }),
            delivery: Digest::of(value.as_bytes()),
            preview: preview.map(|p| Digest::of(p.as_bytes())),
        }
    }

    #[test]
    fn sorts_changes_by_kind() {
        let old = Registry::from_parts(
            1,
            vec![
                token("keep", "k", None, None),
                token("gone", "g", None, None),
                token("prev", "p", Some("pp"), None),
                token("rot", "r", None, None),
                token("narrow", "n", None, Some(&["main", "dev"])),
                token("widen", "w", None, Some(&["main"])),
            ],
            Default::default(),
            Default::default(),
        );
        let new = vec![
            token("keep", "k", None, None),
            token("prev", "p", None, None),
            token("rot", "r2", None, None),
            token("narrow", "n", None, Some(&["main"])),
            token("widen", "w", Some("wp"), Some(&["main", "dev"])),
            token("fresh", "f", None, None),
        ];
        let diff = Diff::between(&old, &new);
        assert_eq!(diff.added, ["fresh"]);
        assert_eq!(diff.removed, ["gone"]);
        assert_eq!(diff.preview_removed, ["prev"]);
        assert_eq!(diff.rotated, ["rot"]);
        assert_eq!(diff.narrowed, ["narrow"]);
        assert_eq!(diff.changed, ["widen"]);
        assert!(!diff.is_empty());
        assert!(Diff::between(
            &old,
            &old.tokens().map(|t| Token::clone(t)).collect::<Vec<_>>()
        )
        .is_empty());
    }

    #[test]
    fn unchanged_tokens_keep_their_allocation_across_versions() {
        let (old, _) = next(
            &Registry::default(),
            vec![
                token("keep", "k", None, Some(&["main"])),
                token("narrow", "n", None, Some(&["main", "dev"])),
            ],
            100,
        )
        .unwrap();
        let (new, _) = next(
            &old,
            vec![
                token("keep", "k", None, Some(&["main"])),
                token("narrow", "n", None, Some(&["main"])),
                token("fresh", "f", None, Some(&["main"])),
            ],
            200,
        )
        .unwrap();
        let kept = new.get("keep").unwrap();
        assert!(Arc::ptr_eq(kept, old.get("keep").unwrap()));
        assert!(!Arc::ptr_eq(
            new.get("narrow").unwrap(),
            old.get("narrow").unwrap()
        ));
        assert_eq!(
            new.get("narrow").unwrap().scope.branches,
            Some(vec!["main".to_owned()])
        );
        // A new token with a kept token's scope shares that scope's copy.
        assert!(Arc::ptr_eq(&new.get("fresh").unwrap().scope, &kept.scope));
        assert!(
            matches!(new.lookup(&Digest::of(b"k")), Lookup::Live(t, _) if Arc::ptr_eq(t, kept))
        );
    }

    #[test]
    fn lookups_tell_live_revoked_and_unknown_apart() {
        let empty = Registry::default();
        let (reg, diff) = next(
            &empty,
            vec![
                listed("a", "tok-a", Some("prev-a")),
                listed("b", "tok-b", None),
            ],
            100,
        )
        .unwrap();
        assert_eq!(diff.added.len(), 2);
        assert!(
            matches!(reg.lookup(&Digest::of(b"tok-a")), Lookup::Live(t, TokenKind::Delivery) if &*t.uid == "a")
        );
        assert!(matches!(
            reg.lookup(&Digest::of(b"prev-a")),
            Lookup::Live(_, TokenKind::Preview)
        ));
        assert!(matches!(reg.lookup(&Digest::of(b"nope")), Lookup::Unknown));

        // Token b deleted, a's preview token deleted alone.
        let (reg2, diff) = next(&reg, vec![listed("a", "tok-a", None)], 200).unwrap();
        assert_eq!(diff.removed, vec!["b".to_string()]);
        assert_eq!(diff.preview_removed, vec!["a".to_string()]);
        assert_eq!(reg2.version(), reg.version() + 1);
        assert!(matches!(
            reg2.lookup(&Digest::of(b"tok-b")),
            Lookup::Revoked(TokenKind::Delivery)
        ));
        assert!(matches!(
            reg2.lookup(&Digest::of(b"prev-a")),
            Lookup::Revoked(TokenKind::Preview)
        ));
        assert!(matches!(
            reg2.lookup(&Digest::of(b"tok-a")),
            Lookup::Live(..)
        ));

        // Same list again: no change, no new version.
        assert!(next(&reg2, vec![listed("a", "tok-a", None)], 300).is_none());

        // Admin revocation hides a live token, lifting it restores it.
        let revoked = reg2.with_admin_revocation("a", true).unwrap();
        assert!(matches!(
            revoked.lookup(&Digest::of(b"tok-a")),
            Lookup::Revoked(TokenKind::Delivery)
        ));
        assert!(revoked.with_admin_revocation("a", true).is_none());
        let lifted = revoked.with_admin_revocation("a", false).unwrap();
        assert!(matches!(
            lifted.lookup(&Digest::of(b"tok-a")),
            Lookup::Live(..)
        ));
    }

    #[test]
    fn revoked_memory_is_bounded_in_time() {
        let (reg, _) = next(&Registry::default(), vec![listed("a", "tok-a", None)], 0).unwrap();
        let (reg, _) = next(&reg, vec![listed("b", "tok-b", None)], 10).unwrap();
        assert!(matches!(
            reg.lookup(&Digest::of(b"tok-a")),
            Lookup::Revoked(_)
        ));
        let later = 10 + REVOKED_MEMORY_SECS + 1;
        let (reg, _) = next(&reg, vec![listed("c", "tok-c", None)], later).unwrap();
        assert!(matches!(reg.lookup(&Digest::of(b"tok-a")), Lookup::Unknown));
        assert!(matches!(
            reg.lookup(&Digest::of(b"tok-b")),
            Lookup::Revoked(_)
        ));
    }

    #[test]
    fn a_relisted_value_is_live_again() {
        let (reg, _) = next(&Registry::default(), vec![listed("a", "tok-a", None)], 0).unwrap();
        let (reg, _) = next(&reg, vec![], 1).unwrap();
        assert!(matches!(
            reg.lookup(&Digest::of(b"tok-a")),
            Lookup::Revoked(_)
        ));
        let (reg, _) = next(&reg, vec![listed("a", "tok-a", None)], 2).unwrap();
        assert!(matches!(
            reg.lookup(&Digest::of(b"tok-a")),
            Lookup::Live(..)
        ));
        assert!(reg.revoked().is_empty());
    }
}
