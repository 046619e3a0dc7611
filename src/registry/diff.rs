//! What a registry change did, token by token.
//!
//! The diff is computed before the new registry is swapped in, and it is what
//! revocation acts on: `removed` and `rotated` end every session of a token,
//! `preview_removed` ends its preview sessions, `narrowed` ends the sessions
//! that the new scope no longer covers.

use std::collections::HashSet;

use serde::Serialize;

use super::model::{Registry, Token};

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::model::{Digest, Scope};

    fn token(uid: &str, value: &str, preview: Option<&str>, branches: Option<&[&str]>) -> Token {
        Token {
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
}
