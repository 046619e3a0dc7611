//! The token registry: what tokens each stack has, kept in sync with the CMA
//! (or a tokens file), persisted to a snapshot, and changed only whole.
//!
//! - [`model`]: tokens, scopes, digests and the immutable [`Registry`].
//! - [`parse`]: the CMA's token list shape.
//! - [`diff`]: what a change did, which drives revocation.
//! - [`source`]: the CMA client (paging) and the tokens file.
//! - [`poll`]: when to sync: the poll loop, backoff, and the shared CMA budget.
//! - [`snapshot`]: the last good registry on disk (digests only).
//! - [`stack`]: one stack's current registry and the lock-serialized path that changes it.

pub mod diff;
pub mod model;
pub mod parse;
pub mod poll;
pub mod snapshot;
pub mod source;
pub mod stack;

pub use diff::Diff;
pub use model::{
    Digest, DigestMemo, Environment, Lookup, Presented, Registry, Scope, Token, TokenKind,
    TokenUsage,
};
pub use stack::{Change, StackRegistry, SyncReport, View};

use std::collections::HashMap;
use std::sync::Arc;

/// Every configured stack, by position and by api_key.
#[derive(Debug, Default)]
pub struct Stacks {
    list: Vec<Arc<StackRegistry>>,
    by_api_key: HashMap<Box<str>, usize, foldhash::fast::RandomState>,
}

impl Stacks {
    /// Indexes `list`; each stack's `index` must be its position.
    pub fn new(list: Vec<Arc<StackRegistry>>) -> Self {
        let by_api_key = list
            .iter()
            .enumerate()
            .map(|(i, s)| (s.api_key.clone(), i))
            .collect();
        Stacks { list, by_api_key }
    }

    /// The stack whose api_key this is.
    pub fn by_api_key(&self, api_key: &str) -> Option<&Arc<StackRegistry>> {
        self.by_api_key.get(api_key).map(|&i| &self.list[i])
    }

    /// All stacks in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<StackRegistry>> {
        self.list.iter()
    }

    /// The stack at `index`.
    pub fn get(&self, index: usize) -> Option<&Arc<StackRegistry>> {
        self.list.get(index)
    }
}
