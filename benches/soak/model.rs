//! The soak's own model of the registry, and SPEC §3 and §4 restated over it.
//!
//! The registry is a sequence of versions: version 0 is what the gateway
//! loaded at start, and every change the driver makes is the next version.
//! [`History`] holds them all, with two counters: `started` (the newest
//! version whose change has begun: the gateway may serve it from now on) and
//! `confirmed` (the newest whose admin call has returned: the gateway serves it
//! or a later one). A request that read `confirmed` before it was sent and
//! `started` after its answer arrived was decided under one of the versions in
//! between, so its answer must be what [`expect`] says for one of them.
//!
//! [`expect`] and [`ends`] are written from SPEC §3 and §4 and README's
//! choices, not from the gateway's code: they are the check, not a copy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Environments, as (name, uid).
pub const ENVS: [(&str, &str); 3] = [
    ("production", "blt_env_prod"),
    ("staging", "blt_env_staging"),
    ("development", "blt_env_dev"),
];

/// The `environment` query values clients send (names and uids).
pub const ENV_PARAMS: [&str; 6] = [
    "production",
    "blt_env_prod",
    "staging",
    "blt_env_staging",
    "development",
    "blt_env_dev",
];

/// The `branch` header values clients send (branches, aliases, and one no
/// token ever lists).
pub const BRANCH_HEADERS: [&str; 7] = [
    "main",
    "development",
    "release",
    "feature",
    "deploy",
    "hotfix",
    "nope",
];

/// A scope: environment (index into [`ENVS`]), branches, aliases.
type Template = (
    usize,
    Option<&'static [&'static str]>,
    Option<&'static [&'static str]>,
);

/// The scopes a token is created with (index = template).
const TEMPLATES: [Template; 5] = [
    (0, Some(&["main", "development"]), Some(&["deploy"])),
    (1, None, None),
    (0, Some(&["main", "release", "feature"]), None),
    (2, Some(&["$all"]), None),
    (1, None, Some(&["deploy", "hotfix"])),
];

/// Which of a token's two values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Delivery,
    Preview,
}

/// A token as listed at one version. Token `n` has uid `blt_soak_{n}`, its
/// delivery value `cs_soak_d_{n}` and, unless `n % 4 == 3`, the preview value
/// `cs_soak_p_{n}`; those never change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tok {
    pub n: u32,
    pub env: usize,
    pub branches: Option<Vec<&'static str>>,
    pub aliases: Option<Vec<&'static str>>,
}

pub fn uid(n: u32) -> String {
    format!("blt_soak_{n:05}")
}

pub fn value(n: u32, kind: Kind) -> String {
    match kind {
        Kind::Delivery => format!("cs_soak_d_{n:05}"),
        Kind::Preview => format!("cs_soak_p_{n:05}"),
    }
}

pub fn has_preview(n: u32) -> bool {
    n % 4 != 3
}

impl Tok {
    /// Token `n` with the scope of `template` (any number; taken modulo).
    pub fn new(n: u32, template: usize) -> Tok {
        let (env, branches, aliases) = TEMPLATES[template % TEMPLATES.len()];
        Tok {
            n,
            env,
            branches: branches.map(<[_]>::to_vec),
            aliases: aliases.map(<[_]>::to_vec),
        }
    }

    /// The scope it was created with.
    pub fn original(n: u32) -> Tok {
        Tok::new(n, n as usize)
    }

    /// The CMA list entry (`GET /v3/stacks/delivery_tokens` shape).
    pub fn json(&self) -> serde_json::Value {
        let uid = uid(self.n);
        let preview = has_preview(self.n).then(|| value(self.n, Kind::Preview));
        crate::cma::token_json(
            &uid,
            &uid,
            &value(self.n, Kind::Delivery),
            preview.as_deref(),
            ENVS[self.env],
            self.branches.as_deref(),
            self.aliases.as_deref(),
        )
    }

    fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.branches
            .iter()
            .chain(self.aliases.iter())
            .flatten()
            .copied()
    }

    /// SPEC §3: no branch module means `main` only; `$all` allows every one.
    pub fn allows_branch(&self, branch: &str) -> bool {
        if self.branches.is_none() && self.aliases.is_none() {
            return branch == "main";
        }
        self.names().any(|b| b == "$all" || b == branch)
    }

    pub fn allows_env(&self, param: &str) -> bool {
        let (name, uid) = ENVS[self.env];
        param == name || param == uid
    }

    /// Whether this scope allows everything `older` did (else the change
    /// narrowed it).
    fn covers(&self, older: &Tok) -> bool {
        if self.env != older.env {
            return false;
        }
        if self.names().any(|b| b == "$all") {
            return true;
        }
        if older.names().any(|b| b == "$all") {
            return false;
        }
        if older.branches.is_none() && older.aliases.is_none() {
            return self.allows_branch("main");
        }
        older.names().all(|b| self.allows_branch(b))
    }

    /// The ways this scope can be narrowed: drop one branch or alias (never
    /// the last name), `$all` down to `main`, or move to another environment.
    pub fn narrowings(&self) -> Vec<Tok> {
        let mut out = Vec::new();
        let total = self.names().count();
        for (i, name) in self.names().enumerate() {
            let mut next = self.clone();
            if name == "$all" {
                let list = if self.branches.as_ref().is_some_and(|b| b.contains(&"$all")) {
                    &mut next.branches
                } else {
                    &mut next.aliases
                };
                if let Some(list) = list {
                    list.retain(|b| *b != "$all");
                    list.push("main");
                }
                out.push(next);
                continue;
            }
            if total < 2 {
                continue;
            }
            let in_branches = self.branches.as_ref().map_or(0, Vec::len);
            if i < in_branches {
                if let Some(list) = &mut next.branches {
                    list.remove(i);
                }
            } else if let Some(list) = &mut next.aliases {
                list.remove(i - in_branches);
            }
            out.push(next);
        }
        for env in 0..ENVS.len() {
            if env != self.env {
                out.push(Tok {
                    env,
                    ..self.clone()
                });
            }
        }
        out
    }
}

/// What happened at a version, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Initial,
    Add,
    Remove,
    Narrow,
    Revoke,
    Lift,
    ReAdd,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 6] = [
        ChangeKind::Add,
        ChangeKind::Remove,
        ChangeKind::Narrow,
        ChangeKind::Revoke,
        ChangeKind::Lift,
        ChangeKind::ReAdd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Initial => "initial",
            ChangeKind::Add => "add",
            ChangeKind::Remove => "remove",
            ChangeKind::Narrow => "narrow",
            ChangeKind::Revoke => "admin revoke",
            ChangeKind::Lift => "lift revoke",
            ChangeKind::ReAdd => "re-add",
        }
    }

    /// Whether the change goes through the registry source and a sync (else
    /// through the admin revoke API).
    pub fn is_sync(self) -> bool {
        !matches!(self, ChangeKind::Revoke | ChangeKind::Lift)
    }
}

/// One version of the registry.
#[derive(Debug, Clone)]
pub struct Version {
    pub tokens: BTreeMap<u32, Arc<Tok>>,
    /// Admin-revoked token numbers (they stay revoked across syncs until lifted).
    pub revoked: BTreeSet<u32>,
    pub kind: ChangeKind,
    /// The token the change was about.
    pub target: Option<u32>,
}

impl Version {
    /// The CMA list of this version.
    pub fn list(&self) -> Vec<serde_json::Value> {
        self.tokens.values().map(|t| t.json()).collect()
    }
}

pub struct Inner {
    pub versions: Vec<Arc<Version>>,
    /// The first version that listed each token.
    first_listed: HashMap<u32, u64>,
}

/// Every version so far, and how far the gateway may be.
pub struct History {
    inner: RwLock<Inner>,
    started: AtomicU64,
    confirmed: AtomicU64,
    /// The number the next added token gets.
    pub next_fresh: AtomicU32,
}

impl History {
    pub fn new(initial: Version) -> History {
        let first_listed = initial.tokens.keys().map(|n| (*n, 0)).collect();
        let next = initial.tokens.keys().max().map_or(0, |n| n + 1);
        History {
            inner: RwLock::new(Inner {
                versions: vec![Arc::new(initial)],
                first_listed,
            }),
            started: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            next_fresh: AtomicU32::new(next),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap()
    }

    /// Read before a request is sent: the gateway serves this version or a later one.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::SeqCst)
    }

    /// Read after an answer arrived: the gateway served this version or an earlier one.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    pub fn latest(&self) -> Arc<Version> {
        let inner = self.read();
        Arc::clone(inner.versions.last().unwrap())
    }

    /// Records the next version and marks its change as begun. Returns its number.
    pub fn begin(&self, next: Version) -> u64 {
        let mut inner = self.inner.write().unwrap();
        let number = inner.versions.len() as u64;
        for n in next.tokens.keys() {
            inner.first_listed.entry(*n).or_insert(number);
        }
        if let Some(max) = next.tokens.keys().max() {
            self.next_fresh.fetch_max(max + 1, Ordering::SeqCst);
        }
        inner.versions.push(Arc::new(next));
        drop(inner);
        self.started.store(number, Ordering::SeqCst);
        number
    }

    /// Marks version `number`'s change as applied by the gateway.
    pub fn confirm(&self, number: u64) {
        self.confirmed.store(number, Ordering::SeqCst);
    }
}

/// A credential a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cred {
    /// One of token `n`'s values (listed or not).
    Token(u32, Kind),
    /// A value no version ever lists.
    Unknown(u64),
}

impl Cred {
    pub fn header_value(self) -> String {
        match self {
            Cred::Token(n, kind) => value(n, kind),
            Cred::Unknown(x) => format!("cs_soak_unknown_{x:016x}"),
        }
    }
}

/// The route a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Delivery,
    Preview,
    Graphql,
}

/// What a request carries that the decision reads.
#[derive(Debug, Clone)]
pub struct Req {
    pub route: Route,
    /// `false`: an api_key no stack has.
    pub stack_ok: bool,
    pub access: Option<Cred>,
    pub preview: Option<Cred>,
    pub env: Option<&'static str>,
    pub branch: Option<&'static str>,
}

impl Req {
    /// The token whose session the request would open if permitted.
    pub fn owner(&self) -> Option<u32> {
        let cred = match self.route {
            Route::Preview => self.preview,
            Route::Delivery | Route::Graphql => self.access,
        };
        match cred {
            Some(Cred::Token(n, _)) => Some(n),
            _ => None,
        }
    }

    pub fn branch_or_main(&self) -> &'static str {
        self.branch.unwrap_or("main")
    }
}

/// The answer SPEC §3 requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Forwarded: 200 from the origin.
    Allow,
    /// Refused with this status and `x-stackgate-reason`.
    Reject(u16, &'static str),
}

enum Look<'a> {
    Live(&'a Tok, Kind),
    Revoked(Kind),
    Unknown,
}

impl Inner {
    pub fn version(&self, v: u64) -> &Version {
        &self.versions[v as usize]
    }

    fn lookup(&self, v: u64, cred: Cred) -> Look<'_> {
        let Cred::Token(n, kind) = cred else {
            return Look::Unknown;
        };
        if kind == Kind::Preview && !has_preview(n) {
            return Look::Unknown;
        }
        let version = self.version(v);
        match version.tokens.get(&n) {
            Some(_) if version.revoked.contains(&n) => Look::Revoked(kind),
            Some(tok) => Look::Live(tok, kind),
            // Listed before and not now: remembered as revoked (README: for 7 days).
            None if self.first_listed.get(&n).is_some_and(|first| *first < v) => {
                Look::Revoked(kind)
            }
            None => Look::Unknown,
        }
    }

    /// SPEC §3 rows 5 and 8 to 14 for `req` under version `v`.
    pub fn expect(&self, v: u64, req: &Req) -> Expect {
        const REVOKED: Expect = Expect::Reject(401, "token_revoked");
        if !req.stack_ok {
            return Expect::Reject(412, "unknown_stack");
        }
        let by_access = req.access.map(|c| self.lookup(v, c));
        let by_preview = req.preview.map(|c| self.lookup(v, c));
        let tok = match req.route {
            Route::Delivery | Route::Graphql => {
                let preview_value = matches!(
                    by_access,
                    Some(Look::Live(_, Kind::Preview) | Look::Revoked(Kind::Preview))
                );
                if (req.access.is_none() && req.preview.is_some()) || preview_value {
                    return Expect::Reject(403, "preview_token_on_delivery");
                }
                match by_access {
                    Some(Look::Revoked(_)) => return REVOKED,
                    Some(Look::Live(tok, Kind::Delivery)) => tok,
                    _ => return Expect::Reject(401, "invalid_token"),
                }
            }
            Route::Preview => {
                if matches!(by_preview, Some(Look::Revoked(_)))
                    || matches!(by_access, Some(Look::Revoked(_)))
                {
                    return REVOKED;
                }
                let Some(Look::Live(tok, Kind::Preview)) = by_preview else {
                    return Expect::Reject(401, "invalid_preview_token");
                };
                if let Some(access) = &by_access {
                    let own = matches!(access, Look::Live(t, Kind::Delivery) if t.n == tok.n);
                    if !own {
                        return Expect::Reject(401, "token_mismatch");
                    }
                }
                tok
            }
        };
        if req.env.is_some_and(|env| !tok.allows_env(env)) {
            return Expect::Reject(403, "environment_out_of_scope");
        }
        if !tok.allows_branch(req.branch_or_main()) {
            return Expect::Reject(422, "branch_out_of_scope");
        }
        Expect::Allow
    }

    /// Whether the change to version `c` ends a session of token `n` used
    /// with `env` (the query value, `None` = the token's own) and `branch`
    /// (SPEC §4): the token deleted, admin-revoked, or narrowed so that the
    /// use is no longer covered.
    pub fn ends(&self, c: u64, n: u32, env: Option<&str>, branch: &str) -> bool {
        if c == 0 {
            return false;
        }
        let (before, after) = (self.version(c - 1), self.version(c));
        let Some(old) = before.tokens.get(&n) else {
            return false;
        };
        if before.revoked.contains(&n) {
            return false;
        }
        let Some(new) = after.tokens.get(&n) else {
            return true;
        };
        if after.revoked.contains(&n) {
            return true;
        }
        if new.covers(old) {
            return false;
        }
        let env_covered = match env {
            None => new.env == old.env,
            Some(param) => new.allows_env(param),
        };
        !(env_covered && new.allows_branch(branch))
    }

    /// Whether any change in `(after, upto]` ends that use.
    pub fn ended_between(
        &self,
        after: u64,
        upto: u64,
        n: u32,
        env: Option<&str>,
        branch: &str,
    ) -> Option<u64> {
        (after + 1..=upto).find(|c| self.ends(*c, n, env, branch))
    }

    /// Token numbers listed before and not now.
    pub fn removed(&self) -> Vec<u32> {
        let latest = self.versions.last().unwrap();
        let mut out: Vec<u32> = self
            .first_listed
            .keys()
            .filter(|n| !latest.tokens.contains_key(n))
            .copied()
            .collect();
        out.sort_unstable();
        out
    }
}
