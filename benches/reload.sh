#!/usr/bin/env bash
# Reloads off the request path: wrk's p99 through stackgate on one CPU, with
# and without a 100,000-token tokens_file rewritten every 2 s, in the same run.
#
#   bash benches/reload.sh                  # 3 pairs of 20 s runs (~2.5 min)
#   RUNS=1 DURATION=10 bash benches/reload.sh
#
# What it starts (127.0.0.1 only, all stopped on exit):
# - origin: nginx answering every request `200 {"entries":[]}`, on core 0;
# - stackgate (release build) pinned to core 1, so it runs tokio's
#   single-threaded scheduler: anything heavy on that thread shows in the
#   request latency. Its registry is a tokens_file of TOKENS (100,000)
#   generated tokens;
# - wrk on core 0, CONNS (64) keep-alive connections, cycling through
#   TOKEN_SAMPLE valid tokens.
#
# Each run pair: a "steady" run (the file untouched), then a "reload" run
# during which the file is replaced (write elsewhere, rename into place)
# every RELOAD_EVERY (2) seconds by one alternating in a token's name, so
# each reload is read, hashed, parsed, diffed and built into a new registry
# of 100,000 tokens. The goal: reload p99 within 2x steady p99.
#
# Needs: nginx, wrk (installed with apt-get when missing), python3, curl,
# taskset, cargo.
set -euo pipefail

RUNS=${RUNS:-3}
DURATION=${DURATION:-20}
CONNS=${CONNS:-64}
TOKENS=${TOKENS:-100000}
TOKEN_SAMPLE=${TOKEN_SAMPLE:-256}
RELOAD_EVERY=${RELOAD_EVERY:-2}
BASE_PORT=${BASE_PORT:-18280}
LOADGEN_CPU=0
ORIGIN_CPU=0
PROXY_CPU=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/stackgate-reload.XXXXXX)}
mkdir -p "$OUT"
P_ORIGIN=$BASE_PORT
P_SG=$((BASE_PORT + 1))
P_SG_ADMIN=$((BASE_PORT + 2))
API_KEY=blt0123456789abcdef
REQ_PATH="/v3/content_types/blog_post/entries?environment=production&locale=en-us"
export STACKGATE_BENCH_ADMIN_TOKEN="bench-$RANDOM$RANDOM"

log() { printf '== %s\n' "$*" >&2; }

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
for tool in nginx wrk python3 curl taskset cargo; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
for port in $(seq "$P_ORIGIN" "$P_SG_ADMIN"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use; set BASE_PORT" >&2
        exit 1
    fi
done

log "building (cargo build --release --locked)"
(cd "$ROOT" && cargo build --release --locked --quiet --bin stackgate)
BIN="$ROOT/target/release/stackgate"

log "generating $TOKENS tokens and configs in $OUT"
python3 - "$OUT" "$TOKENS" "$TOKEN_SAMPLE" "$REQ_PATH" <<'PY'
import json, sys
out, n, sample, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def value(i):
    return "cs%032x" % ((i * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128))

def doc(variant):
    return {"tokens": [{
        "uid": "blt%016x" % i,
        # Token 0's name alternates: every reload is a real change.
        "name": ("Delivery token %d" % i) + (" (%s)" % variant if i == 0 else ""),
        "token": value(i),
        "preview_token": "pv%030x" % i,
        "type": "delivery",
        "scope": [
            {"module": "environment", "acl": {"read": True},
             "environments": [{"name": "production", "uid": "blt5f1c2a9e3d7b4c60"}]},
            {"module": "branch", "acl": {"read": True}, "branches": ["main"]},
        ],
    } for i in range(n)]}

for variant in ("a", "b"):
    with open(f"{out}/tokens-{variant}.json", "w") as f:
        json.dump(doc(variant), f)

LUA = """
local tokens = {%s}
local reqs = {}
local i = 0
function init(args)
  for k, t in ipairs(tokens) do
    wrk.headers["api_key"] = "blt0123456789abcdef"
    wrk.headers["access_token"] = t
    reqs[k] = wrk.format("GET", %s)
  end
end
function request()
  i = i %% #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%%d duration_us=%%d p50_us=%%d p99_us=%%d max_us=%%d status_errors=%%d socket_errors=%%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""
picked = [value((k * n) // sample) for k in range(sample)]
with open(f"{out}/tokens.lua", "w") as f:
    f.write(LUA % (", ".join('"%s"' % t for t in picked), json.dumps(path)))
PY
cp "$OUT/tokens-a.json" "$OUT/tokens.json"

mkdir -p "$OUT/origin/tmp"
cat >"$OUT/origin/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $OUT/origin/nginx.pid;
error_log $OUT/origin/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $OUT/origin/tmp;
    proxy_temp_path $OUT/origin/tmp;
    fastcgi_temp_path $OUT/origin/tmp;
    uwsgi_temp_path $OUT/origin/tmp;
    scgi_temp_path $OUT/origin/tmp;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    access_log off;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        location / {
            default_type application/json;
            return 200 '{"entries":[]}';
        }
    }
}
EOF

cat >"$OUT/stackgate.toml" <<EOF
[listen]
http = "127.0.0.1:$P_SG"
admin = "127.0.0.1:$P_SG_ADMIN"

[admin]
token_env = "STACKGATE_BENCH_ADMIN_TOKEN"

[server]
grace_period = "1s"

[upstream]
connect_timeout = "1s"
request_timeout = "10s"

[[routes]]
kind = "delivery"
hosts = ["*"]
upstream = "http://127.0.0.1:$P_ORIGIN"

[[stacks]]
name = "bench"
api_key = "$API_KEY"

[stacks.registry]
tokens_file = "$OUT/tokens.json"
snapshot = "$OUT/snapshot.json"
max_staleness = "0"

[stacks.limits]
per_token = { rate = 1000000000, burst = 1000000000 }
origin = { rate = 1000000000, burst = 1000000000 }
failed_auth_per_ip = { rate = 5, burst = 20 }
EOF
"$BIN" check --config "$OUT/stackgate.toml" >/dev/null 2>&1

wait_for() { # url, what
    local i
    for i in $(seq 1 300); do
        curl -s -o /dev/null --max-time 1 -f "$1" && return 0
        sleep 0.1
    done
    echo "$2 did not come up ($1)" >&2
    exit 1
}

taskset -c "$ORIGIN_CPU" nginx -e "$OUT/origin/error.log" -p "$OUT/origin" -c "$OUT/origin/nginx.conf" &
PIDS+=("$!")
RUST_LOG=warn taskset -c "$PROXY_CPU" "$BIN" run --config "$OUT/stackgate.toml" 2>"$OUT/stackgate.log" &
PIDS+=("$!")
wait_for "http://127.0.0.1:$P_SG_ADMIN/readyz" stackgate
wait_for "http://127.0.0.1:$P_ORIGIN/" origin

version() {
    curl -s "http://127.0.0.1:$P_SG_ADMIN/metrics" |
        awk '/^stackgate_registry_version\{stack="bench"\}/ {print $2}'
}

# Replaces the tokens file every RELOAD_EVERY seconds until killed.
reloader() {
    local variant=b
    while true; do
        sleep "$RELOAD_EVERY"
        cp "$OUT/tokens-$variant.json" "$OUT/tokens.json.tmp"
        mv "$OUT/tokens.json.tmp" "$OUT/tokens.json"
        [[ $variant == a ]] && variant=b || variant=a
    done
}

run_wrk() { # label
    taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
        -s "$OUT/tokens.lua" "http://127.0.0.1:$P_SG/" 2>&1 | grep '^RESULT' | sed "s/^RESULT/$1/"
}

log "warming up"
taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d3s -s "$OUT/tokens.lua" "http://127.0.0.1:$P_SG/" >/dev/null

for run in $(seq 1 "$RUNS"); do
    log "run $run/$RUNS: steady"
    run_wrk steady | tee -a "$OUT/results.txt"
    log "run $run/$RUNS: reload every ${RELOAD_EVERY}s"
    before=$(version)
    reloader &
    RELOADER=$!
    run_wrk reload | tee -a "$OUT/results.txt"
    kill "$RELOADER" 2>/dev/null || true
    wait "$RELOADER" 2>/dev/null || true
    after=$(version)
    echo "reload registry_versions=$before->$after" | tee -a "$OUT/results.txt"
done

python3 - "$OUT/results.txt" <<'PY'
import re, statistics, sys
rows = {"steady": [], "reload": []}
for line in open(sys.argv[1]):
    m = re.match(r"(steady|reload) (.*)", line)
    if m and "p99_us" in m.group(2):
        rows[m.group(1)].append(dict(kv.split("=") for kv in m.group(2).split()))
def med(label, key):
    return statistics.median(int(r[key]) for r in rows[label])
for label in ("steady", "reload"):
    if rows[label]:
        rps = statistics.median(int(r["requests"]) * 1e6 / int(r["duration_us"]) for r in rows[label])
        print(f"{label:7} req/s {rps:9.0f}  p50 {med(label, 'p50_us') / 1000:7.2f} ms"
              f"  p99 {med(label, 'p99_us') / 1000:7.2f} ms  max {med(label, 'max_us') / 1000:7.2f} ms"
              f"  (median of {len(rows[label])})")
if rows["steady"] and rows["reload"]:
    print(f"p99 reload / steady: {med('reload', 'p99_us') / med('steady', 'p99_us'):.2f}x (goal: at most 2x)")
PY
log "results in $OUT"
