//! Every Redis key and channel of cluster mode, under `<key_prefix>:`.
//!
//! Nothing under these keys ever holds a token value (SPEC §9, §10): the
//! registry document carries digests, the admin set carries uids.

/// The keys of one stack.
#[derive(Debug, Clone)]
pub struct StackKeys {
    /// Hash: `version`, `doc` (the leader's registry, digests only),
    /// `published_ms`, `floor` (a version every node must pass, raised by
    /// nodes that ran ahead during an outage).
    pub registry: String,
    /// Set: uids revoked through the admin API, cluster-wide.
    pub admin_revoked: String,
    /// String: the node id holding the poller lease, with a TTL.
    pub lease: String,
    /// Pub/sub channel: each new version number, as it is stored.
    pub versions: String,
}

impl StackKeys {
    /// The keys of stack `name` under `prefix`.
    pub fn new(prefix: &str, name: &str) -> StackKeys {
        let base = format!("{prefix}:stack:{name}");
        StackKeys {
            registry: format!("{base}:registry"),
            admin_revoked: format!("{base}:admin_revoked"),
            lease: format!("{base}:lease"),
            versions: format!("{base}:versions"),
        }
    }
}

/// The channel every node listens on for sync requests (payload: stack name).
pub fn sync_channel(prefix: &str) -> String {
    format!("{prefix}:sync")
}

/// The pattern matching every stack's versions channel.
pub fn versions_pattern(prefix: &str) -> String {
    format!("{prefix}:stack:*:versions")
}

/// The stack name in a versions channel, if it is one.
pub fn stack_of_channel<'a>(prefix: &str, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix(":stack:")?
        .strip_suffix(":versions")
}

/// Sorted set: node id -> last heartbeat (unix ms).
pub fn nodes(prefix: &str) -> String {
    format!("{prefix}:nodes")
}

/// Counter of CMA requests in one wall-clock second, shared by every node.
pub fn cma_budget(prefix: &str, unix_sec: u64) -> String {
    format!("{prefix}:cma_budget:{unix_sec}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_versions_channel_names_its_stack() {
        let keys = StackKeys::new("sg", "web:site");
        assert_eq!(keys.versions, "sg:stack:web:site:versions");
        assert_eq!(stack_of_channel("sg", &keys.versions), Some("web:site"));
        assert_eq!(stack_of_channel("sg", "sg:sync"), None);
        assert_eq!(stack_of_channel("other", &keys.versions), None);
    }
}
