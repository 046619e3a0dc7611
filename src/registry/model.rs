//! The registry model: tokens, their scopes, and the immutable per-stack
//! [`Registry`] that every decision reads.
//!
//! Token values never live here: only their SHA-256 [`Digest`]s. A registry is
//! built whole and never mutated; a change produces a new one (see
//! [`crate::registry::diff::next`]) together with the
//! [`crate::registry::diff::Diff`] that revocation acts on.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::metrics::Usage;

/// How long a removed token's digest is remembered, so that it is answered
/// `token_revoked` rather than `invalid_token`.
pub const REVOKED_MEMORY_SECS: u64 = 7 * 24 * 3600;
/// At most this many revoked digests are remembered per stack (oldest go first).
pub const REVOKED_MEMORY_MAX: usize = 100_000;

/// The SHA-256 digest of a token value. Equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of a presented or listed token value.
    pub fn of(secret: &[u8]) -> Digest {
        Digest(Sha256::digest(secret).into())
    }

    /// Lower-case hex, for the snapshot file.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Digest> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq::constant_time_eq_32(&self.0, &other.0)
    }
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly distributed; eight bytes are plenty for a bucket.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// The credential header a presented value came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    AccessToken = 0,
    PreviewToken = 1,
}

/// The digests of the last values one connection presented, one per
/// credential header: a connection that sends the same token on every
/// request (a site's visitors behind its one delivery token) hashes it once.
///
/// Only the digest is remembered, never a lookup: every request still looks
/// its digest up in the current registry. Kept per connection and never
/// shared, so that finding a value here tells a client only that it sent the
/// same value before; the value is compared in constant time.
/// [`DigestMemo::forget`] drops the values (a parked connection keeps none).
#[derive(Default)]
pub struct DigestMemo(Mutex<Option<Box<[Remembered; 2]>>>);

#[derive(Default)]
struct Remembered {
    value: Vec<u8>,
    digest: Option<Digest>,
}

impl DigestMemo {
    /// Longer values are hashed every time, not kept.
    const VALUE_MAX: usize = 256;

    /// The digest of `value`, presented in `field`.
    pub fn digest(&self, field: Presented, value: &[u8]) -> Digest {
        if value.len() > Self::VALUE_MAX {
            return Digest::of(value);
        }
        // Held by another stream of the same HTTP/2 connection: hash.
        let Ok(mut memo) = self.0.try_lock() else {
            return Digest::of(value);
        };
        let slot = &mut memo.get_or_insert_with(Box::default)[field as usize];
        if let Some(digest) = slot.digest {
            if constant_time_eq::constant_time_eq(&slot.value, value) {
                return digest;
            }
        }
        let digest = Digest::of(value);
        slot.value.clear();
        slot.value.extend_from_slice(value);
        slot.digest = Some(digest);
        digest
    }

    /// Drops the remembered values.
    pub fn forget(&self) {
        if let Ok(mut memo) = self.0.lock() {
            *memo = None;
        }
    }
}

/// A hasher that passes a [`Digest`]'s leading eight bytes through.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by digests. Keys come from the registry, never from clients,
/// so the pass-through hash cannot be flooded.
pub type DigestMap<V> = HashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

/// Which of a delivery token's two values a digest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// The delivery token (`access_token`).
    Delivery,
    /// Its preview token (`preview_token`).
    Preview,
}

/// A Contentstack environment, matched by name or uid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Environment {
    pub name: String,
    pub uid: String,
}

/// What a delivery token may read (SPEC §3 rows 13 and 14).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    /// The token's environment (one in practice; the CMA shape allows a list).
    pub environments: Vec<Environment>,
    /// The `branch` module's list, if the scope has that module.
    pub branches: Option<Vec<String>>,
    /// The `branch_alias` module's list, if the scope has that module.
    pub aliases: Option<Vec<String>>,
}

/// The branch asked for when a request names none.
pub const DEFAULT_BRANCH: &str = "main";
/// The wildcard that allows every branch or alias.
pub const ALL_BRANCHES: &str = "$all";

impl Scope {
    /// Whether `env`, as given in a request, is the name or uid of the token's environment.
    pub fn allows_environment(&self, env: &str) -> bool {
        self.environments
            .iter()
            .any(|e| e.name == env || e.uid == env)
    }

    /// Whether the token may read `branch` (a branch name or an alias).
    pub fn allows_branch(&self, branch: &str) -> bool {
        if self.branches.is_none() && self.aliases.is_none() {
            return branch == DEFAULT_BRANCH;
        }
        self.branch_names()
            .any(|name| name == ALL_BRANCHES || name == branch)
    }

    fn branch_names(&self) -> impl Iterator<Item = &str> {
        self.branches
            .iter()
            .chain(self.aliases.iter())
            .flatten()
            .map(String::as_str)
    }

    fn allows_all_branches(&self) -> bool {
        self.branch_names().any(|name| name == ALL_BRANCHES)
    }

    /// Whether this scope still allows everything `older` allowed.
    pub fn covers(&self, older: &Scope) -> bool {
        let environments = older.environments.iter().all(|e| {
            self.environments
                .iter()
                .any(|n| n.uid == e.uid && n.name == e.name)
        });
        let branches = if self.allows_all_branches() {
            true
        } else if older.allows_all_branches() {
            false
        } else if older.branches.is_none() && older.aliases.is_none() {
            self.allows_branch(DEFAULT_BRANCH)
        } else {
            older.branch_names().all(|name| self.allows_branch(name))
        };
        environments && branches
    }
}

/// A delivery token as the registry knows it: everything but its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub uid: Arc<str>,
    pub name: String,
    /// Shared by every token of a registry with the same scope (see
    /// [`Registry::from_parts`]).
    pub scope: Arc<Scope>,
    /// Digest of the delivery token value.
    pub delivery: Digest,
    /// Digest of the preview token value, if the token has one.
    pub preview: Option<Digest>,
    /// What the gateway counts for the token; not part of what the token
    /// is (see [`TokenUsage`]).
    pub usage: TokenUsage,
}

/// A token's [`Usage`], shared by every registry version that lists the
/// token ([`Registry::from_listing`] carries it by uid). It is state, not
/// identity: two tokens compare equal whatever their usage, so a listing
/// compares with the last one by what the CMA says alone.
#[derive(Clone, Default)]
pub struct TokenUsage(Arc<Usage>);

impl std::ops::Deref for TokenUsage {
    type Target = Usage;

    fn deref(&self) -> &Usage {
        &self.0
    }
}

impl PartialEq for TokenUsage {
    fn eq(&self, _: &TokenUsage) -> bool {
        true
    }
}

impl Eq for TokenUsage {}

impl fmt::Debug for TokenUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenUsage")
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

/// A digest that used to be valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub uid: Arc<str>,
    pub kind: TokenKind,
    /// Unix seconds when the registry learned of it.
    pub at: u64,
}

/// What a presented token value is, according to the registry.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// A listed, unrevoked token; the value is its `kind` value.
    Live(&'a Arc<Token>, TokenKind),
    /// A value that was valid once and is revoked now.
    Revoked(TokenKind),
    /// Never seen (or forgotten).
    Unknown,
}

/// One stack's tokens at one version. Immutable; swapped whole.
///
/// The token maps (what a sync builds) are shared, behind an `Arc`, by every
/// version that only differs in its admin revocations: an admin revocation
/// makes a new version in O(admin-revoked uids), whatever the registry's size.
#[derive(Debug, Default)]
pub struct Registry {
    version: u64,
    tokens: Arc<Tokens>,
    admin_revoked: Arc<BTreeSet<Arc<str>>>,
}

/// What a sync lists: the tokens by uid and by digest, and the revoked digests.
#[derive(Debug, Default)]
struct Tokens {
    by_uid: HashMap<Arc<str>, Arc<Token>>,
    live: DigestMap<(Arc<Token>, TokenKind)>,
    revoked: DigestMap<Revoked>,
}

impl Registry {
    /// Builds a registry from its parts (used by snapshots and [`super::diff::next`]).
    pub fn from_parts(
        version: u64,
        tokens: Vec<Token>,
        revoked: DigestMap<Revoked>,
        admin_revoked: BTreeSet<Arc<str>>,
    ) -> Registry {
        Registry::from_listing(version, tokens, None, revoked, admin_revoked)
    }

    /// [`Registry::from_parts`], keeping `previous`'s allocation of every
    /// token listed unchanged: a reload of 100,000 tokens of which one
    /// changed allocates one token, its long-lived objects stay where they
    /// were (so the memory the reload frees goes back whole), and an
    /// unchanged token is the same `Arc` in both versions. A changed token
    /// keeps its [`TokenUsage`] (found by uid).
    pub fn from_listing(
        version: u64,
        tokens: Vec<Token>,
        previous: Option<&Registry>,
        revoked: DigestMap<Revoked>,
        admin_revoked: BTreeSet<Arc<str>>,
    ) -> Registry {
        let mut by_uid = HashMap::with_capacity(tokens.len());
        let mut live = DigestMap::default();
        live.reserve(tokens.len() * 2);
        // Tokens of a stack share a handful of scopes (an environment and
        // its branches). Sharing one copy of each keeps the scope checks of
        // any token in cache, and saves memory per token.
        let mut scopes: HashSet<Arc<Scope>> = HashSet::new();
        for mut token in tokens {
            let before = previous.and_then(|previous| previous.get(&token.uid));
            let token = match before.filter(|before| ***before == token) {
                Some(kept) => {
                    if !scopes.contains(&kept.scope) {
                        scopes.insert(Arc::clone(&kept.scope));
                    }
                    Arc::clone(kept)
                }
                None => {
                    if let Some(before) = before {
                        token.usage = before.usage.clone();
                    }
                    match scopes.get(&token.scope) {
                        Some(shared) => token.scope = Arc::clone(shared),
                        None => {
                            scopes.insert(Arc::clone(&token.scope));
                        }
                    }
                    Arc::new(token)
                }
            };
            live.insert(token.delivery, (Arc::clone(&token), TokenKind::Delivery));
            if let Some(preview) = token.preview {
                live.insert(preview, (Arc::clone(&token), TokenKind::Preview));
            }
            by_uid.insert(Arc::clone(&token.uid), token);
        }
        Registry {
            version,
            tokens: Arc::new(Tokens {
                by_uid,
                live,
                revoked,
            }),
            admin_revoked: Arc::new(admin_revoked),
        }
    }

    /// This registry's tokens at `version`, with `base`'s admin revocations:
    /// how a sync's result is swapped in over whatever the admin API did
    /// while it was fetching. Shares the token maps; costs O(1).
    pub fn rebased(&self, version: u64, base: &Registry) -> Registry {
        Registry {
            version,
            tokens: Arc::clone(&self.tokens),
            admin_revoked: Arc::clone(&base.admin_revoked),
        }
    }

    /// Whether `other` holds the very same token maps (not a copy).
    pub fn same_tokens(&self, other: &Registry) -> bool {
        Arc::ptr_eq(&self.tokens, &other.tokens)
    }

    /// Increases with every change; 0 for a registry that never loaded.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many tokens are listed.
    pub fn len(&self) -> usize {
        self.tokens.by_uid.len()
    }

    /// Whether no token is listed.
    pub fn is_empty(&self) -> bool {
        self.tokens.by_uid.is_empty()
    }

    /// A listed token by uid.
    pub fn get(&self, uid: &str) -> Option<&Arc<Token>> {
        self.tokens.by_uid.get(uid)
    }

    /// Every listed token, in no particular order.
    pub fn tokens(&self) -> impl Iterator<Item = &Arc<Token>> {
        self.tokens.by_uid.values()
    }

    /// Remembered revoked digests.
    pub fn revoked(&self) -> &DigestMap<Revoked> {
        &self.tokens.revoked
    }

    /// Uids revoked through the admin API.
    pub fn admin_revoked(&self) -> &BTreeSet<Arc<str>> {
        &self.admin_revoked
    }

    /// Whether the admin API revoked this uid.
    pub fn is_admin_revoked(&self, uid: &str) -> bool {
        self.admin_revoked.contains(uid)
    }

    /// Looks up a presented token value by its digest.
    pub fn lookup(&self, digest: &Digest) -> Lookup<'_> {
        if let Some((token, kind)) = self.tokens.live.get(digest) {
            if self.admin_revoked.contains(&token.uid) {
                return Lookup::Revoked(*kind);
            }
            return Lookup::Live(token, *kind);
        }
        match self.tokens.revoked.get(digest) {
            Some(revoked) => Lookup::Revoked(revoked.kind),
            None => Lookup::Unknown,
        }
    }

    /// The registry with `uid`'s admin revocation set (`revoked = true`) or lifted.
    /// `None` when that is already the state. Shares the token maps: the cost
    /// does not grow with the number of tokens.
    pub fn with_admin_revocation(&self, uid: &str, revoked: bool) -> Option<Registry> {
        if self.admin_revoked.contains(uid) == revoked {
            return None;
        }
        let mut admin_revoked = BTreeSet::clone(&self.admin_revoked);
        if revoked {
            admin_revoked.insert(Arc::from(uid));
        } else {
            admin_revoked.remove(uid);
        }
        Some(Registry {
            version: self.version.saturating_add(1),
            tokens: Arc::clone(&self.tokens),
            admin_revoked: Arc::new(admin_revoked),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_remembered_digest_is_only_given_for_the_same_value() {
        let memo = DigestMemo::default();
        let of = |v: &str| Digest::of(v.as_bytes());
        let (access, preview) = (Presented::AccessToken, Presented::PreviewToken);
        assert_eq!(memo.digest(access, b"cs_one"), of("cs_one"));
        assert_eq!(memo.digest(access, b"cs_one"), of("cs_one"));
        // Another value, a prefix, an extension, an empty value: each its own.
        for value in ["cs_two", "cs_tw", "cs_two_", "", "cs_one"] {
            assert_eq!(
                memo.digest(access, value.as_bytes()),
                of(value),
                "{value:?}"
            );
        }
        // The other header has its own slot.
        assert_eq!(memo.digest(preview, b"cs_pre"), of("cs_pre"));
        assert_eq!(memo.digest(access, b"cs_one"), of("cs_one"));
        assert_eq!(memo.digest(preview, b"cs_one"), of("cs_one"));
        memo.forget();
        assert!(memo.0.lock().is_ok_and(|m| m.is_none()));
        assert_eq!(memo.digest(access, b"cs_one"), of("cs_one"));
        let long = "x".repeat(DigestMemo::VALUE_MAX + 1);
        assert_eq!(memo.digest(access, long.as_bytes()), of(&long));
        assert_eq!(memo.digest(access, b"cs_one"), of("cs_one"));
    }

    pub(crate) fn token(uid: &str, value: &str, preview: Option<&str>) -> Token {
        Token {
            usage: Default::default(),
            uid: Arc::from(uid),
            name: format!("{uid} name"),
            scope: Arc::new(Scope {
                environments: vec![Environment {
                    name: "production".into(),
                    uid: "blt_env_prod".into(),
                }],
                branches: None,
                aliases: None,
            }),
            delivery: Digest::of(value.as_bytes()),
            preview: preview.map(|p| Digest::of(p.as_bytes())),
        }
    }

    fn scope(branches: Option<&[&str]>, aliases: Option<&[&str]>) -> Scope {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Scope {
            environments: vec![],
            branches: branches.map(list),
            aliases: aliases.map(list),
        }
    }

    #[test]
    fn branch_rules() {
        let none = scope(None, None);
        assert!(none.allows_branch("main"));
        assert!(!none.allows_branch("dev"));
        let listed = scope(Some(&["main", "development"]), Some(&["deploy"]));
        assert!(listed.allows_branch("development"));
        assert!(listed.allows_branch("deploy"));
        assert!(!listed.allows_branch("Deploy"), "names compare exactly");
        assert!(!listed.allows_branch("release"));
        assert!(scope(Some(&["$all"]), None).allows_branch("anything"));
        assert!(scope(None, Some(&["$all"])).allows_branch("anything"));
        let only_dev = scope(Some(&["dev"]), None);
        assert!(
            !only_dev.allows_branch("main"),
            "a branch module without main excludes main"
        );
    }

    #[test]
    fn covers_detects_narrowing() {
        let wide = scope(Some(&["main", "dev"]), None);
        let narrow = scope(Some(&["main"]), None);
        assert!(wide.covers(&narrow));
        assert!(!narrow.covers(&wide));
        assert!(scope(Some(&["$all"]), None).covers(&wide));
        assert!(!wide.covers(&scope(Some(&["$all"]), None)));
        assert!(wide.covers(&scope(None, None)));
        assert!(!scope(Some(&["dev"]), None).covers(&scope(None, None)));
        let mut moved = wide.clone();
        let mut old_env = wide.clone();
        old_env.environments.push(Environment {
            name: "production".into(),
            uid: "e1".into(),
        });
        moved.environments.push(Environment {
            name: "staging".into(),
            uid: "e2".into(),
        });
        assert!(!moved.covers(&old_env));
    }

    #[test]
    fn tokens_with_the_same_scope_share_it() {
        let mut other = token("c", "v3", None);
        other.scope = Arc::new(Scope {
            branches: Some(vec!["dev".into()]),
            ..Scope::clone(&other.scope)
        });
        let tokens = vec![token("a", "v1", None), token("b", "v2", None), other];
        let registry = Registry::from_parts(1, tokens, DigestMap::default(), BTreeSet::new());
        let scope = |uid: &str| Arc::clone(&registry.get(uid).unwrap().scope);
        assert!(Arc::ptr_eq(&scope("a"), &scope("b")));
        assert!(!Arc::ptr_eq(&scope("a"), &scope("c")));
        assert_eq!(scope("c").branches, Some(vec!["dev".to_owned()]));
    }

    #[test]
    fn a_token_keeps_its_usage_across_versions_until_it_is_gone() {
        let listing = |version, tokens, previous| {
            Registry::from_listing(
                version,
                tokens,
                previous,
                DigestMap::default(),
                BTreeSet::new(),
            )
        };
        let usage = |registry: &Registry, uid: &str| registry.get(uid).unwrap().usage.requests();
        let v1 = listing(
            1,
            vec![token("a", "v1", None), token("b", "v2", None)],
            None,
        );
        v1.get("a").unwrap().usage.refused();
        v1.get("b").unwrap().usage.refused();
        // "a" unchanged, "b" rotated: each keeps what it counted.
        let v2 = listing(
            2,
            vec![token("a", "v1", None), token("b", "v2-new", None)],
            Some(&v1),
        );
        assert_eq!((usage(&v2, "a"), usage(&v2, "b")), (1, 1));
        // Counted on the old version (a request decided on it) shows on the new.
        v1.get("b").unwrap().usage.refused();
        assert_eq!(usage(&v2, "b"), 2);
        assert_eq!(v2.get("b").unwrap().usage.rejections(), 2);
        // Gone, then listed again: a new token as far as usage goes.
        let v3 = listing(3, vec![token("a", "v1", None)], Some(&v2));
        let v4 = listing(
            4,
            vec![token("a", "v1", None), token("b", "v2-new", None)],
            Some(&v3),
        );
        assert_eq!((usage(&v4, "a"), usage(&v4, "b")), (1, 0));
        assert_eq!(v4.get("b").unwrap().usage.last_used(), None);
        assert!(v1.get("b").unwrap().usage.last_used().is_some());
    }

    #[test]
    fn an_admin_revocation_shares_the_token_maps() {
        let tokens = (0..1000)
            .map(|i| token(&format!("t{i}"), &format!("v{i}"), None))
            .collect();
        let registry = Registry::from_parts(7, tokens, DigestMap::default(), BTreeSet::new());
        let revoked = registry.with_admin_revocation("t1", true).unwrap();
        assert!(revoked.same_tokens(&registry), "the maps were rebuilt");
        assert_eq!(revoked.version(), 8);
        assert!(matches!(
            revoked.lookup(&Digest::of(b"v1")),
            Lookup::Revoked(TokenKind::Delivery)
        ));
        assert!(matches!(
            registry.lookup(&Digest::of(b"v1")),
            Lookup::Live(..)
        ));

        // A sync's result, built before the revocation, carries it over.
        let built = Registry::from_parts(
            8,
            vec![token("t1", "v1", None)],
            DigestMap::default(),
            BTreeSet::new(),
        );
        let swapped = built.rebased(9, &revoked);
        assert!(swapped.same_tokens(&built));
        assert!(swapped.is_admin_revoked("t1"));
        assert_eq!(swapped.version(), 9);
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let d = Digest::of(b"value");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
        assert!(!format!("{d:?}").contains(&d.to_hex()));
    }
}
