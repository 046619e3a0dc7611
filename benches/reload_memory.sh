#!/usr/bin/env bash
# Resident memory after reloads: the gateway's RSS with a 100,000-token
# registry, once loaded and after each of RELOADS reloads, per token above
# its RSS with 3 tokens, against the registry's own size measured in the
# same run.
#
#   bash benches/reload_memory.sh              # ~3 min with the bench build
#   RELOADS=4 bash benches/reload_memory.sh
#
# What it starts (127.0.0.1 only, stopped on exit): the release binary with
# a tokens_file stack and a snapshot path (as an operator would run it). It
# reads VmRSS from /proc after 3 tokens are loaded, after the file is
# replaced by TOKENS (100,000) tokens, and after each reload (the file
# replaced by a variant differing in one token's name, so each reload is
# read, parsed, diffed, built into a new registry and snapshotted), each
# SETTLE (2) seconds after the gateway's registry version moved.
#
# The registry's own size: `DECISION_SIZES=$TOKENS cargo bench --bench
# decision`, which counts the bytes the allocator hands out and still holds
# once a registry of that many tokens is built (no allocator slack).
#
# Needs: python3, curl, cargo.
set -euo pipefail

TOKENS=${TOKENS:-100000}
RELOADS=${RELOADS:-8}
SETTLE=${SETTLE:-2}
BASE_PORT=${BASE_PORT:-18290}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mktemp -d /tmp/stackgate-reload-memory.XXXXXX)
P_SG=$((BASE_PORT + 1))
P_ADMIN=$((BASE_PORT + 2))

log() { printf '== %s\n' "$*" >&2; }

PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

log "building (cargo build --release --locked)"
(cd "$ROOT" && cargo build --release --locked --quiet --bin stackgate)

log "measuring the registry's own size at $TOKENS tokens (cargo bench --bench decision)"
# Its line: "memory:    100000 tokens:   36.0 MiB held,   377 B/token held (...)".
PER_TOKEN=$(cd "$ROOT" && DECISION_SIZES=$TOKENS cargo bench --locked --quiet --bench decision -- '^$' 2>/dev/null |
    awk -v n="$TOKENS" '$1 == "memory:" && $2 == n {for (i = 2; i < NF; i++) if ($i == "B/token" && $(i + 1) == "held") {print $(i - 1); exit}}')
if [ -z "$PER_TOKEN" ]; then
    echo "the decision bench printed no memory line for $TOKENS tokens" >&2
    exit 1
fi

log "generating tokens in $OUT"
python3 - "$OUT" "$TOKENS" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])

def value(i):
    return "cs%032x" % ((i * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128))

def doc(variant, count):
    return {"tokens": [{
        "uid": "blt%016x" % i,
        # Token 0's name differs between variants: every reload is a change.
        "name": ("Delivery token %d" % i) + (" (%s)" % variant if i == 0 else ""),
        "token": value(i),
        "preview_token": "pv%030x" % i,
        "type": "delivery",
        "scope": [
            {"module": "environment", "acl": {"read": True},
             "environments": [{"name": "production", "uid": "blt5f1c2a9e3d7b4c60"}]},
            {"module": "branch", "acl": {"read": True}, "branches": ["main"]},
        ],
    } for i in range(count)]}

for variant in ("a", "b"):
    with open(f"{out}/tokens-{variant}.json", "w") as f:
        json.dump(doc(variant, n), f)
with open(f"{out}/tokens-small.json", "w") as f:
    json.dump(doc("s", 3), f)
PY
cp "$OUT/tokens-small.json" "$OUT/tokens.json"
cat >"$OUT/stackgate.toml" <<EOF
[listen]
http = "127.0.0.1:$P_SG"
admin = "127.0.0.1:$P_ADMIN"

[[routes]]
kind = "delivery"
hosts = ["*"]
upstream = "http://127.0.0.1:$BASE_PORT"

[[stacks]]
name = "bench"
api_key = "blt0123456789abcdef"

[stacks.registry]
tokens_file = "$OUT/tokens.json"
snapshot = "$OUT/snapshot.json"
EOF

RUST_LOG=warn "$ROOT/target/release/stackgate" run --config "$OUT/stackgate.toml" \
    >"$OUT/stackgate.out" 2>"$OUT/stackgate.err" &
PID=$!
for _ in $(seq 1 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$P_ADMIN/readyz" && break
    sleep 0.1
done

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; }
metric() {
    curl -fs "http://127.0.0.1:$P_ADMIN/metrics" |
        awk -v name="$1" 'index($1, name "{") == 1 {print $2}'
}
version=$(metric stackgate_registry_version)
# replace FILE: puts FILE in place and waits for the registry to move on.
replace() {
    cp "$1" "$OUT/tokens.new" && mv "$OUT/tokens.new" "$OUT/tokens.json"
    local now
    for _ in $(seq 1 600); do
        now=$(metric stackgate_registry_version)
        if [ "$now" != "$version" ]; then
            version=$now
            sleep "$SETTLE"
            return 0
        fi
        sleep 0.1
    done
    echo "the registry did not move to the new file" >&2
    exit 1
}

sleep "$SETTLE"
SMALL=$(rss_kb)
replace "$OUT/tokens-a.json"
if [ "$(metric stackgate_registry_tokens)" != "$TOKENS" ]; then
    echo "the registry does not hold $TOKENS tokens" >&2
    exit 1
fi
LOADED=$(rss_kb)
AFTER=()
for r in $(seq 1 "$RELOADS"); do
    if [ $((r % 2)) = 1 ]; then replace "$OUT/tokens-b.json"; else replace "$OUT/tokens-a.json"; fi
    AFTER+=("$(rss_kb)")
done

python3 - "$TOKENS" "$PER_TOKEN" "$SMALL" "$LOADED" "${AFTER[@]}" <<'PY'
import statistics, sys
tokens, per_token = int(sys.argv[1]), float(sys.argv[2])
small, loaded = int(sys.argv[3]), int(sys.argv[4])
after = [int(a) for a in sys.argv[5:]]
registry = per_token * tokens
def per(kb):
    return (kb - small) * 1024 / tokens
print()
print(f"registry's own size at {tokens} tokens: {registry / 2**20:.1f} MiB ({per_token:.0f} B per token)")
print(f"RSS with 3 tokens: {small / 1024:.1f} MiB")
print(f"RSS with {tokens} tokens, loaded: {loaded / 1024:.1f} MiB ({per(loaded):.0f} B per token above 3 tokens)")
print("RSS after each reload (MiB): " + " ".join(f"{a / 1024:.1f}" for a in after))
worst, median = max(after), statistics.median(after)
print(f"after reloads: median {median / 1024:.1f} MiB ({per(median):.0f} B per token), "
      f"max {worst / 1024:.1f} MiB ({per(worst):.0f} B per token)")
print(f"ratio to the registry's own size, per token above 3 tokens: "
      f"median {per(median) / per_token:.2f}x, max {per(worst) / per_token:.2f}x (goal: at most 2x)")
PY
