#!/usr/bin/env bash
# Instructions per request under callgrind: what one allowed HTTP/1.1 request
# costs stackgate, counted by valgrind, so that the figure does not move with
# the machine's load. With BASE=<git revision>, the same is measured for that
# revision (built in a temporary worktree) in the same run, and the ratio is
# printed: the way to check that a change to the request path costs what it
# should.
#
#   bash benches/instructions.sh
#   BASE=HEAD~3 bash benches/instructions.sh
#
# What it starts (all on 127.0.0.1, all stopped on exit): a Python origin
# answering every request `200 {"entries":[]}` over HTTP/1.1 keep-alive, and
# each gateway in turn under `valgrind --tool=callgrind`, with a tokens_file of
# TOKENS (1,000) tokens and one delivery route. After a warm-up, counting is
# switched on, wrk sends REQUESTS_SECONDS (15) seconds of keep-alive requests
# on 4 connections with one valid token and a query, and the instructions
# counted are divided by the requests wrk completed. The access log is off
# (RUST_LOG=warn) unless ACCESS_LOG=on.
#
# REQUEST=refused measures a refusal instead: the same request with a token
# the registry does not hold (401 invalid_token; no rate limits configured,
# so every answer is that refusal).
#
# PATTERN=random draws each request's token at random from the TOKENS
# (allowed requests only; the floor ignores tokens), as load.sh's random
# pattern does: the digest memo misses and every per-token record changes
# from one request to the next. Its warm-up is RANDOM_WARM (3,000) requests
# and its counted run RANDOM_REQUESTS (15,000), each drawn from a fixed seed:
# how often a token comes back (its first use costs more) depends on the
# number of requests, so every build gets the same sequence.
#
# KEEP=DIR keeps the callgrind files there (for callgrind_annotate).
# FLOOR=1 also measures the bare floor (examples/bare_proxy.rs: the same
# server, pool and runtime, no checks) in the same run: what stackgate adds.
# CLUSTER=1 also measures the same binary in cluster mode (a `[cluster]`
# section, one local redis-server started for the run), in the same run: the
# request path's cost in cluster mode against standalone.
#
# Needs: valgrind, wrk (installed with apt-get when missing), python3, curl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE=${BASE:-}
KEEP=${KEEP:-}
CLUSTER=${CLUSTER:-}
FLOOR=${FLOOR:-}
PORT_REDIS=${PORT_REDIS:-18384}
TOKENS=${TOKENS:-1000}
SECONDS_LOAD=${REQUESTS_SECONDS:-15}
ACCESS_LOG=${ACCESS_LOG:-off}
REQUEST=${REQUEST:-allowed}
PATTERN=${PATTERN:-one}
# PATTERN=random: requests in the warm-up and in the counted run.
RANDOM_WARM=${RANDOM_WARM:-3000}
RANDOM_REQUESTS=${RANDOM_REQUESTS:-15000}
case "$PATTERN" in
    one | random) ;;
    *) echo "PATTERN is one or random" >&2; exit 2 ;;
esac
if [ "$PATTERN" = random ] && [ "$REQUEST" != allowed ]; then
    echo "PATTERN=random is for allowed requests" >&2
    exit 2
fi
case "$REQUEST" in
    allowed) TOKEN_SENT=cs_bench_value_000042 ;;
    refused) TOKEN_SENT=cs_bench_value_unknown ;;
    *) echo "REQUEST is allowed or refused" >&2; exit 2 ;;
esac
PORT_ORIGIN=${PORT_ORIGIN:-18381}
PORT_GATEWAY=${PORT_GATEWAY:-18382}
PORT_ADMIN=${PORT_ADMIN:-18383}

for tool in valgrind wrk; do
    if ! command -v "$tool" >/dev/null; then
        apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null
    fi
done

OUT=$(mktemp -d)
# A fixed place for the base's source, so that its build stays incremental.
BASE_TREE="$(pwd)/target/bench-base-src"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$BASE" ] && [ -d "$BASE_TREE" ]; then git worktree remove --force "$BASE_TREE" || true; fi
    rm -rf "$OUT"
}
trap cleanup EXIT

# The origin.
cat >"$OUT/origin.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        # One write: a head and a body written apart meet Nagle and delayed
        # ACKs on the gateway's upstream connection (40 ms a request, so
        # that idle wake-ups would weigh on every request counted).
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: 14\r\n\r\n" + b'{"entries":[]}')
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$OUT/origin.py" "$PORT_ORIGIN" &
PIDS+=($!)

# Tokens and config.
python3 - "$OUT/tokens.json" "$TOKENS" <<'PY'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
tokens = [{
    "uid": f"blt_bench_{i:06d}", "name": f"bench {i}",
    "token": f"cs_bench_value_{i:06d}", "type": "delivery",
    "scope": [{"module": "environment", "acl": {"read": True},
               "environments": [{"name": "production", "uid": "blt_env_prod"}]},
              {"module": "branch", "acl": {"read": True}, "branches": ["main"]}],
} for i in range(n)]
json.dump({"tokens": tokens}, open(path, "w"))
PY
cat >"$OUT/stackgate.toml" <<EOF
[listen]
http = "127.0.0.1:$PORT_GATEWAY"
admin = "127.0.0.1:$PORT_ADMIN"

[[routes]]
kind = "delivery"
hosts = ["*"]
upstream = "http://127.0.0.1:$PORT_ORIGIN"

[[stacks]]
name = "bench"
api_key = "blt_bench_stack"

[stacks.registry]
tokens_file = "$OUT/tokens.json"
EOF
cat >"$OUT/request.lua" <<LUA
wrk.headers["api_key"] = "blt_bench_stack"
wrk.headers["access_token"] = "$TOKEN_SENT"
wrk.path = "/v3/content_types/blog/entries?environment=production&locale=en-us&include[]=author"
LUA
if [ "$PATTERN" = random ]; then
    # Each request a token drawn at random from the whole registry. The
    # share of first uses of a token (which cost more: a series, a session)
    # falls as requests repeat tokens, so every build gets the same
    # sequence and the same number of requests: the warm-up and the counted
    # run each draw from their own fixed seed and stop after a fixed count.
    cat >>"$OUT/request.lua" <<LUA
math.randomseed(tonumber(os.getenv("BENCH_SEED")))
local cap, seen = tonumber(os.getenv("BENCH_CAP")), 0
request = function()
    wrk.headers["access_token"] = string.format("cs_bench_value_%06d", math.random(0, $TOKENS - 1))
    return wrk.format()
end
-- wrk has no request count: at the cap, report as wrk does (the lines the
-- script reads) and end. Up to 3 requests in flight on the other
-- connections are served uncounted (0.02% of the count).
local bad = 0
response = function(status)
    seen = seen + 1
    if status ~= 200 then bad = bad + 1 end
    if seen >= cap then
        io.write(string.format("  %d requests in (capped)\n", seen))
        if bad > 0 then io.write(string.format("  Non-2xx or Socket Errors: %d\n", bad)) end
        io.stdout:flush()
        os.exit(0)
    end
end
LUA
fi

wait_for() {
    for _ in $(seq 1 600); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    return 1
}

# measure NAME BINARY [CONFIG]: prints "NAME instructions-per-request requests"
measure() {
    local config=${3:-$OUT/stackgate.toml}
    measure_cmd "$1" "http://127.0.0.1:$PORT_ADMIN/readyz" "$2" run --config "$config"
}

# measure_cmd NAME READY_URL COMMAND...: the same for any server on
# PORT_GATEWAY, once READY_URL answers.
measure_cmd() {
    local name=$1 ready=$2 log="$OUT/$1.callgrind"
    shift 2
    local filter=warn
    [ "$ACCESS_LOG" = on ] && filter=info
    RUST_LOG=$filter valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$log" "$@" \
        >"$OUT/$name.out" 2>"$OUT/$name.err" &
    local pid=$!
    wait_for "$ready"
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "$name: the gateway exited (port in use? see PORT_*):" >&2
        tail -n 5 "$OUT/$name.err" >&2
        exit 1
    fi
    # Warm-up, uncounted. With PATTERN=random, a fixed count of requests
    # instead of a time (see request.lua).
    local warm=-d3s counted=-d"${SECONDS_LOAD}s"
    [ "$PATTERN" = random ] && warm=-d600s counted=-d600s
    BENCH_SEED=7 BENCH_CAP=$RANDOM_WARM \
        wrk -t1 -c4 "$warm" -s "$OUT/request.lua" "http://127.0.0.1:$PORT_GATEWAY" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    callgrind_control -i on "$pid" >/dev/null
    local writes_before writes_after
    writes_before=$(awk '/^syscw/ {print $2}' "/proc/$pid/io")
    BENCH_SEED=42 BENCH_CAP=$RANDOM_REQUESTS \
        wrk -t1 -c4 "$counted" -s "$OUT/request.lua" "http://127.0.0.1:$PORT_GATEWAY" >"$OUT/$name.wrk"
    writes_after=$(awk '/^syscw/ {print $2}' "/proc/$pid/io")
    callgrind_control -i off "$pid" >/dev/null
    # stackgate drains on SIGINT; the floor ignores it (a background job of
    # a script), so TERM follows (callgrind writes its counts either way).
    kill -INT "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || true
    local requests non200 total
    requests=$(awk '/requests in/ {print $1}' "$OUT/$name.wrk")
    non200=$(awk '/Non-2xx/ {print $NF}' "$OUT/$name.wrk")
    if [ "$REQUEST" = refused ] && [ "${non200:-0}" != "$requests" ]; then
        echo "$name: only ${non200:-0} of $requests answers were refusals" >&2
        exit 1
    fi
    if [ "$REQUEST" = allowed ] && [ -n "$non200" ]; then
        echo "$name: $non200 answers were not 2xx" >&2
        exit 1
    fi
    if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && cp "$log"* "$KEEP/"; fi
    total=$(cat "$log"* | awk '/^(summary|totals):/ {s += $2} END {print s}')
    if [ -z "$total" ] || [ "$total" = 0 ]; then
        echo "$name: no instructions counted" >&2
        exit 1
    fi
    python3 -c "print(f'$name {int($total) / $requests:.0f} $requests {($writes_after - $writes_before) / $requests:.3f}')"
}

cargo build --release --locked --bin stackgate >/dev/null
RESULTS=()
RESULTS+=("$(measure current target/release/stackgate)")
if [ -n "$FLOOR" ]; then
    cargo build --release --locked --example bare_proxy >/dev/null
    # The floor answers any path; readiness is a forwarded request.
    RESULTS+=("$(measure_cmd floor "http://127.0.0.1:$PORT_GATEWAY/" target/release/examples/bare_proxy \
        "127.0.0.1:$PORT_GATEWAY" "http://127.0.0.1:$PORT_ORIGIN")")
fi
if [ -n "$CLUSTER" ]; then
    command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
    redis-server --bind 127.0.0.1 --port "$PORT_REDIS" --save '' --appendonly no --dir "$OUT" >/dev/null &
    PIDS+=($!)
    { cat "$OUT/stackgate.toml"; printf '\n[cluster]\nredis_url_env = "STACKGATE_REDIS_URL"\nnode_id = "bench-1"\n'; } >"$OUT/cluster.toml"
    export STACKGATE_REDIS_URL="redis://127.0.0.1:$PORT_REDIS"
    RESULTS+=("$(measure cluster target/release/stackgate "$OUT/cluster.toml")")
fi
if [ -n "$BASE" ]; then
    git worktree remove --force "$BASE_TREE" 2>/dev/null || rm -rf "$BASE_TREE"
    git worktree prune
    git worktree add --detach -q "$BASE_TREE" "$BASE"
    CARGO_TARGET_DIR="$(pwd)/target/bench-base" cargo build --release --locked \
        --manifest-path "$BASE_TREE/Cargo.toml" --bin stackgate >/dev/null
    RESULTS+=("$(measure base target/bench-base/release/stackgate)")
fi

echo
echo "instructions per $REQUEST request (callgrind, HTTP/1.1 keep-alive, 4 connections, $PATTERN token of $TOKENS, access log $ACCESS_LOG)"
printf '%-8s %14s %10s %15s\n' build instructions requests 'writes/request'
for line in "${RESULTS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-8s %14s %10s %15s\n' $line
done
figure() { printf '%s\n' "${RESULTS[@]}" | awk -v name="$1" '$1 == name {print $2}'; }
current=$(figure current)
if [ -n "$FLOOR" ]; then
    floor=$(figure floor)
    python3 -c "print(f'current/floor: {$current / $floor:.3f}')"
fi
if [ -n "$CLUSTER" ]; then
    cluster=$(figure cluster)
    python3 -c "print(f'cluster/standalone: {$cluster / $current:.3f}')"
fi
if [ -n "$BASE" ]; then
    base=$(figure base)
    python3 -c "print(f'current/base ({\"$BASE\"}): {$current / $base:.3f}')"
fi
