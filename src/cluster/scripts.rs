//! The Lua scripts that make cluster writes atomic in Redis.
//!
//! Versions only move forward: every write sets `version` to one more than
//! the highest of the stored version and the floor, and at least the
//! caller's `min_version` (so a node that changed its registry locally first
//! never finds itself ahead of the cluster). Publication is fenced: it
//! writes only while the caller holds the stack's lease. The registry hash
//! gets an `epoch` (Redis's clock) when it is created, so that a node can
//! tell a Redis that lost its data from one that moved on without it.

/// Takes or renews the lease. KEYS: lease. ARGV: node id, ttl ms.
/// Returns the holder after the call (this node if it got or kept it).
pub const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return ARGV[1]
end
return holder
"#;

/// Gives the lease up if this node holds it. KEYS: lease. ARGV: node id.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Fenced publication of a registry document. KEYS: registry, lease,
/// versions channel. ARGV: node id, doc, min_version, now ms.
/// Returns the new version, or -1 if the caller does not hold the lease.
pub const PUBLISH: &str = include_str!("publish.lua");

/// Sets or lifts an admin revocation. KEYS: registry, admin set, versions
/// channel. ARGV: uid, "1" to revoke or "0" to lift, min_version, now ms.
/// Returns the new version.
pub const ADMIN: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'epoch', t[1] .. '.' .. t[2])
end
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('SREM', KEYS[2], ARGV[1])
end
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '0')
local version = math.max(current, floor) + 1
version = math.max(version, tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'version', version, 'published_ms', ARGV[4])
redis.call('PUBLISH', KEYS[3], version)
return version
"#;

/// The stored state, read atomically. KEYS: registry, admin set.
/// Returns {version, doc or false, published_ms, {admin uids}, epoch or false}.
pub const READ: &str = r#"
local fields = redis.call('HMGET', KEYS[1], 'version', 'doc', 'published_ms', 'epoch')
local admin = redis.call('SMEMBERS', KEYS[2])
return {tonumber(fields[1] or '0'), fields[2], tonumber(fields[3] or '0'), admin, fields[4]}
"#;

/// The stored version. KEYS: registry.
pub const VERSION: &str = r#"
return tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
"#;

/// The stored version and floor. KEYS: registry.
pub const STATE: &str = r#"
local fields = redis.call('HMGET', KEYS[1], 'version', 'floor')
return {tonumber(fields[1] or '0'), tonumber(fields[2] or '0')}
"#;

/// Raises the floor to a version a node reached on its own, if that is
/// above the stored version (a node at the stored version takes the stored
/// content instead, see `catch_up`; a floor equal to the version would make
/// the poller publish again for nothing). KEYS: registry. ARGV: version.
/// Returns the stored version.
pub const RAISE_FLOOR: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'epoch', t[1] .. '.' .. t[2])
end
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '0')
local reached = tonumber(ARGV[1])
if reached > floor and reached > version then
  redis.call('HSET', KEYS[1], 'floor', ARGV[1])
end
return version
"#;

/// One CMA request from the cluster-wide budget. KEYS: this second's
/// counter. ARGV: budget per second. Returns 1 if granted.
pub const BUDGET: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], 2000)
end
if n <= tonumber(ARGV[1]) then
  return 1
end
return 0
"#;

/// Heartbeat and live nodes. KEYS: nodes. ARGV: node id, now ms, window ms.
/// Returns the node ids seen within the window.
pub const HEARTBEAT: &str = r#"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local since = tonumber(ARGV[2]) - tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. since)
return redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf')
"#;
