#!/usr/bin/env bash
# Request-path load test: stackgate against nginx as a plain
# reverse proxy, on one machine, everything on 127.0.0.1.
#
#   bash benches/load.sh                 # 3 runs of 10 s per target and mode (~8 min)
#   RUNS=1 DURATION=5 bash benches/load.sh
#
# What it starts (all bound to 127.0.0.1, all stopped on exit):
# - origin: nginx answering every request `200 {"entries":[]}` (application/json);
# - nginx: a plain reverse proxy to the origin (proxy_pass, HTTP/1.1 upstream
#   keep-alive), on an HTTP/1.1 port, an h2c (prior knowledge) port and a TLS port;
# - hyper: examples/bare_proxy.rs, a hyper server forwarding every request
#   through the HTTP/1.1 pool stackgate uses, on the same runtime, with an
#   access line per request like nginx's and no checks or metrics: the floor
#   of a hyper-based proxy doing nginx's work on this machine (h1, h2c);
# - stackgate (release build) with a tokens_file of TOKENS (100,000) generated
#   tokens, one delivery route to the origin, plain (HTTP/1.1 + h2c) and TLS
#   listeners. Every request carries api_key and a valid access_token.
#
# Token patterns (stackgate's cost depends on them; the other targets ignore
# the token):
# - random: each request picks one of TOKEN_SAMPLE (4,096) tokens spread over
#   the whole registry at random (modes h1, h1-c1, tls);
# - one: every request of every connection carries the same token, a site's
#   visitors all using its one delivery token (mode h1-one; h2load in h2c).
#
# Pinning (2 cores): the proxy under test (nginx's one worker, or stackgate
# and the bare proxy, which then run tokio's single-threaded scheduler) on
# core 1; the origin and the load generator share core 0. "direct" is wrk straight at the origin.
#
# Modes (each target in turn, runs interleaved; each figure is the median of RUNS;
# CPU per request is the user and system time of the proxy process (for
# "direct", the origin's worker) over the run, divided by the requests served):
# - h1:      wrk, HTTP/1.1 keep-alive, CONNS (64) connections: throughput, p50, p99
# - h1-one:  the same with one token for every request
# - h1-c1:   wrk, one connection, one request at a time: latency without queueing
# - h2c:     h2load, prior knowledge, H2_CONNS connections x H2_STREAMS streams
# - tls:     wrk over https (TLS 1.3, self-signed ECDSA P-256), CONNS connections
#
# The last table is the yardstick: stackgate's CPU per request (user + sys)
# and requests/s over the bare floor's (examples/bare_proxy.rs) in the same
# runs, for each token pattern.
#
# All three proxies write an access log line per request (nginx to a file,
# stackgate and the bare proxy to stderr redirected to a file);
# ACCESS_LOG=off turns them all off.
# With LIMITS=on (the default) stackgate has every rate limit of
# [stacks.limits] configured (row 15 runs for each request), set high enough
# never to refuse; LIMITS=off leaves them out.
# STACKGATE_BIN=PATH runs that stackgate binary instead of this tree's (to
# compare two builds against the same floor, one run after the other).
# PROFILE=1 records `perf record -e cpu-clock -g` of stackgate during its
# first h1 run into $OUT/stackgate.perf.data.
#
# Needs: nginx, wrk, h2load (installed with apt-get when missing), python3,
# openssl, curl, taskset, cargo.
set -euo pipefail

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-4}
TOKENS=${TOKENS:-100000}
TOKEN_SAMPLE=${TOKEN_SAMPLE:-4096}
MODES=${MODES:-"h1 h1-one h1-c1 h2c tls"}
ACCESS_LOG=${ACCESS_LOG:-on}
LIMITS=${LIMITS:-on}
PROFILE=${PROFILE:-0}
BASE_PORT=${BASE_PORT:-18180}
LOADGEN_CPU=0
ORIGIN_CPU=0
PROXY_CPU=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/stackgate-load.XXXXXX)}
mkdir -p "$OUT"

P_ORIGIN=$BASE_PORT
P_NGINX=$((BASE_PORT + 1))
P_NGINX_H2=$((BASE_PORT + 2))
P_NGINX_TLS=$((BASE_PORT + 3))
P_SG=$((BASE_PORT + 4))
P_SG_TLS=$((BASE_PORT + 5))
P_SG_ADMIN=$((BASE_PORT + 6))
P_SG_SMALL=$((BASE_PORT + 7))
P_SG_SMALL_ADMIN=$((BASE_PORT + 8))
P_HYPER=$((BASE_PORT + 9))

API_KEY=blt0123456789abcdef
REQ_PATH="/v3/content_types/blog_post/entries?environment=production&locale=en-us"
export STACKGATE_BENCH_ADMIN_TOKEN="bench-$RANDOM$RANDOM"

log() { printf '== %s\n' "$*" >&2; }

# --- everything we start is killed on exit --------------------------------
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

# --- tools ------------------------------------------------------------------
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
for tool in nginx wrk h2load python3 openssl curl taskset cargo; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
for port in $(seq "$P_ORIGIN" "$P_HYPER"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use; set BASE_PORT" >&2
        exit 1
    fi
done

log "building (cargo build --release --locked)"
(cd "$ROOT" && cargo build --release --locked --quiet --bin stackgate --example bare_proxy)
BIN=${STACKGATE_BIN:-"$ROOT/target/release/stackgate"}
BARE="$ROOT/target/release/examples/bare_proxy"

# --- files ------------------------------------------------------------------
log "generating $TOKENS tokens, certificate and configs in $OUT"
python3 - "$OUT" "$TOKENS" "$TOKEN_SAMPLE" "$REQ_PATH" <<'PY'
import json, sys
out, n, sample, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def value(i):
    return "cs%032x" % ((i * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128))

def doc(count):
    return {"tokens": [{
        "uid": "blt%016x" % i,
        "name": "Delivery token %d" % i,
        "token": value(i),
        "preview_token": "pv%030x" % i,
        "type": "delivery",
        "scope": [
            {"module": "environment", "acl": {"read": True},
             "environments": [{"name": "production", "uid": "blt5f1c2a9e3d7b4c60"}]},
            {"module": "branch", "acl": {"read": True}, "branches": ["main"]},
        ],
    } for i in range(count)]}

with open(f"{out}/tokens.json", "w") as f:
    json.dump(doc(n), f)
with open(f"{out}/tokens-small.json", "w") as f:
    json.dump(doc(min(n, 1000)), f)

# Requests are formatted once per token in init(); request() only picks one.
LUA = """
local tokens = {%s}
local reqs = {}
function init(args)
  math.randomseed(os.time())
  for k, t in ipairs(tokens) do
    wrk.headers["api_key"] = "blt0123456789abcdef"
    wrk.headers["access_token"] = t
    wrk.headers["branch"] = "main"
    reqs[k] = wrk.format("GET", %s)
  end
end
function request()
  return reqs[math.random(#reqs)]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%%d duration_us=%%d p50_us=%%d p99_us=%%d status_errors=%%d socket_errors=%%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""
for name, count in (("tokens", n), ("tokens-small", min(n, 1000))):
    picked = [value((k * count) // sample) for k in range(min(sample, count))]
    with open(f"{out}/{name}.lua", "w") as f:
        f.write(LUA % (", ".join('"%s"' % t for t in picked), json.dumps(path)))
    if name == "tokens":
        with open(f"{out}/token", "w") as f:
            f.write(picked[0])
        with open(f"{out}/one.lua", "w") as f:
            f.write(LUA % ('"%s"' % picked[0], json.dumps(path)))
PY

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null

if [[ $ACCESS_LOG == on ]]; then
    NGINX_LOG="access_log $OUT/nginx-access.log;"
    RUST_LOG_LEVEL=info
else
    NGINX_LOG="access_log off;"
    RUST_LOG_LEVEL=warn
fi

nginx_conf() { # name, http-block body
    mkdir -p "$OUT/$1"
    cat >"$OUT/$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $OUT/$1/nginx.pid;
error_log $OUT/$1/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $OUT/$1/tmp;
    proxy_temp_path $OUT/$1/tmp;
    fastcgi_temp_path $OUT/$1/tmp;
    uwsgi_temp_path $OUT/$1/tmp;
    scgi_temp_path $OUT/$1/tmp;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
$2
}
EOF
}

nginx_conf origin "
    access_log off;
    server {
        listen 127.0.0.1:$P_ORIGIN;
        location / {
            default_type application/json;
            return 200 '{\"entries\":[]}';
        }
    }"

PROXY_LOCATION="
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }"
nginx_conf nginx "
    $NGINX_LOG
    upstream origin {
        server 127.0.0.1:$P_ORIGIN;
        keepalive 128;
        keepalive_requests 10000000;
    }
    server { listen 127.0.0.1:$P_NGINX; $PROXY_LOCATION }
    server { listen 127.0.0.1:$P_NGINX_H2 http2; $PROXY_LOCATION }
    server {
        listen 127.0.0.1:$P_NGINX_TLS ssl;
        ssl_certificate $OUT/cert.pem;
        ssl_certificate_key $OUT/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        $PROXY_LOCATION
    }"

sg_conf() { # file, http port, https port (or empty), admin port, tokens file
    local https=""
    [[ -n $3 ]] && https="https = \"127.0.0.1:$3\""
    cat >"$1" <<EOF
[listen]
http = "127.0.0.1:$2"
$https
admin = "127.0.0.1:$4"

[tls]
cert = "$OUT/cert.pem"
key = "$OUT/key.pem"

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
tokens_file = "$5"
max_staleness = "0"
EOF
    if [[ $LIMITS == on ]]; then
        cat >>"$1" <<EOF

[stacks.limits]
per_token = { rate = 1000000000, burst = 1000000000 }
origin = { rate = 1000000000, burst = 1000000000 }
failed_auth_per_ip = { rate = 5, burst = 20 }
EOF
    fi
}
sg_conf "$OUT/stackgate.toml" "$P_SG" "$P_SG_TLS" "$P_SG_ADMIN" "$OUT/tokens.json"
sg_conf "$OUT/stackgate-small.toml" "$P_SG_SMALL" "" "$P_SG_SMALL_ADMIN" "$OUT/tokens-small.json"
"$BIN" check --config "$OUT/stackgate.toml" >/dev/null

# --- processes ----------------------------------------------------------------
wait_for() { # url, what
    local i
    for i in $(seq 1 300); do
        curl -sk -o /dev/null --max-time 1 -f "$1" && return 0
        sleep 0.1
    done
    echo "$2 did not come up ($1)" >&2
    exit 1
}

start_nginx() { # name, cpu -> sets NGINX_WORKER (the one worker's pid)
    taskset -c "$2" nginx -e "$OUT/$1/error.log" -p "$OUT/$1" -c "$OUT/$1/nginx.conf" &
    local master=$!
    PIDS+=("$master")
    local i
    NGINX_WORKER=""
    for i in $(seq 1 50); do
        NGINX_WORKER=$(pgrep -P "$master" | head -1) && [[ -n $NGINX_WORKER ]] && return 0
        sleep 0.1
    done
    echo "nginx $1 has no worker" >&2
    exit 1
}

start_stackgate() { # config, admin port, log  -> sets SG_PID
    RUST_LOG=$RUST_LOG_LEVEL taskset -c "$PROXY_CPU" "$BIN" run --config "$1" 2>"$3" &
    SG_PID=$!
    PIDS+=("$SG_PID")
    wait_for "http://127.0.0.1:$2/readyz" stackgate
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# User and system CPU ticks of a process, all its threads.
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

start_nginx origin "$ORIGIN_CPU"
ORIGIN_WORKER=$NGINX_WORKER
wait_for "http://127.0.0.1:$P_ORIGIN/" origin
start_nginx nginx "$PROXY_CPU"
PROXY_WORKER=$NGINX_WORKER
wait_for "http://127.0.0.1:$P_NGINX/" nginx
BARE_LOG=""
[[ $ACCESS_LOG == on ]] && BARE_LOG=1
BARE_ACCESS_LOG=$BARE_LOG taskset -c "$PROXY_CPU" "$BARE" "127.0.0.1:$P_HYPER" "http://127.0.0.1:$P_ORIGIN" 2>"$OUT/hyper-access.log" &
HYPER_PID=$!
PIDS+=("$HYPER_PID")
wait_for "http://127.0.0.1:$P_HYPER/" "the bare hyper proxy"

# Resident memory of a loaded registry: TOKENS tokens against 1,000, each
# read when ready and again after 3 s of load (mimalloc hands the memory
# freed after parsing the tokens file back to the system only as the
# process goes on allocating).
settle() { # port, lua
    taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d3s -s "$2" "http://127.0.0.1:$1$REQ_PATH" >/dev/null
    sleep 1
}
start_stackgate "$OUT/stackgate-small.toml" "$P_SG_SMALL_ADMIN" "$OUT/stackgate-small.log"
settle "$P_SG_SMALL" "$OUT/tokens-small.lua"
RSS_SMALL=$(rss_kib "$SG_PID")
kill "$SG_PID"
wait "$SG_PID" 2>/dev/null || true
LOAD_START=$(date +%s.%N)
start_stackgate "$OUT/stackgate.toml" "$P_SG_ADMIN" "$OUT/stackgate.log"
LOAD_SECS=$(python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$LOAD_START" "$(date +%s.%N)")
RSS_READY=$(rss_kib "$SG_PID")
settle "$P_SG" "$OUT/tokens.lua"
RSS_LOADED=$(rss_kib "$SG_PID")

# A request must be allowed and answered by the origin through every target.
TOKEN=$(cat "$OUT/token")
check() { # url
    local body
    body=$(curl -sk --max-time 5 -H "api_key: $API_KEY" -H "access_token: $TOKEN" -H "branch: main" "$1")
    [[ $body == '{"entries":[]}' ]] || { echo "unexpected answer from $1: $body" >&2; exit 1; }
}
check "http://127.0.0.1:$P_SG$REQ_PATH"
check "https://127.0.0.1:$P_SG_TLS$REQ_PATH"
check "http://127.0.0.1:$P_NGINX$REQ_PATH"
check "http://127.0.0.1:$P_HYPER$REQ_PATH"
check "https://127.0.0.1:$P_NGINX_TLS$REQ_PATH"
denied=$(curl -s -o /dev/null -w '%{http_code}' -H "api_key: $API_KEY" -H "access_token: nope" "http://127.0.0.1:$P_SG$REQ_PATH")
[[ $denied == 401 ]] || { echo "an unknown token got $denied, not 401" >&2; exit 1; }

# --- load -----------------------------------------------------------------------
RESULTS="$OUT/results.tsv"
printf 'mode\ttarget\trun\trps\tp50_us\tp99_us\terrors\tuser_us\tsys_us\n' >"$RESULTS"

url_of() { # mode, target
    case "$1:$2" in
        h1*:direct) echo "http://127.0.0.1:$P_ORIGIN$REQ_PATH" ;;
        h1*:nginx) echo "http://127.0.0.1:$P_NGINX$REQ_PATH" ;;
        h1*:stackgate) echo "http://127.0.0.1:$P_SG$REQ_PATH" ;;
        h1*:hyper | h2c:hyper) echo "http://127.0.0.1:$P_HYPER$REQ_PATH" ;;
        h2c:nginx) echo "http://127.0.0.1:$P_NGINX_H2$REQ_PATH" ;;
        h2c:stackgate) echo "http://127.0.0.1:$P_SG$REQ_PATH" ;;
        tls:nginx) echo "https://127.0.0.1:$P_NGINX_TLS$REQ_PATH" ;;
        tls:stackgate) echo "https://127.0.0.1:$P_SG_TLS$REQ_PATH" ;;
    esac
}

pid_of() { # target: the process whose CPU time is charged to it
    case "$1" in
        direct) echo "$ORIGIN_WORKER" ;;
        nginx) echo "$PROXY_WORKER" ;;
        hyper) echo "$HYPER_PID" ;;
        stackgate) echo "$SG_PID" ;;
    esac
}

targets_of() {
    case "$1" in
        h1 | h1-c1) echo "direct nginx hyper stackgate" ;;
        h1-one) echo "nginx hyper stackgate" ;;
        h2c) echo "nginx hyper stackgate" ;;
        *) echo "nginx stackgate" ;;
    esac
}

run_wrk() { # mode, target, run, seconds -> one RESULT line
    local conns=$CONNS script=$OUT/tokens.lua
    [[ $1 == h1-c1 ]] && conns=1
    [[ $1 == h1-one ]] && script=$OUT/one.lua
    timeout $(($4 + 30)) taskset -c "$LOADGEN_CPU" \
        wrk -t1 -c"$conns" -d"$4"s --timeout 5s -s "$script" "$(url_of "$1" "$2")" |
        grep '^RESULT'
}

run_h2load() { # target, run, seconds -> one RESULT line
    local logf="$OUT/h2load-$1-$2.log" outf="$OUT/h2load-$1-$2.out"
    timeout $(($3 + 30)) taskset -c "$LOADGEN_CPU" \
        h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D"$3" \
        -H "api_key: $API_KEY" -H "access_token: $TOKEN" -H "branch: main" \
        --log-file="$logf" "$(url_of h2c "$1")" >"$outf" 2>&1
    python3 - "$logf" "$outf" "$3" <<'PY'
import re, sys
durations, bad = [], 0
for line in open(sys.argv[1]):
    _, status, us = line.split()
    durations.append(int(us))
    bad += status != "200"
durations.sort()
out = open(sys.argv[2]).read()
rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
pct = lambda p: durations[min(len(durations) - 1, int(len(durations) * p / 100))]
print("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=0 rps=%.1f"
      % (len(durations), int(float(sys.argv[3]) * 1e6), pct(50), pct(99), bad, rps))
PY
    rm -f "$logf"
}

record() { # mode, target, run, RESULT line, cpu ticks before, cpu ticks after
    python3 - "$@" "$(getconf CLK_TCK)" >>"$RESULTS" <<'PY'
import sys
mode, target, run, line, before, after, hz = sys.argv[1:8]
f = dict(kv.split("=") for kv in line.split()[1:])
requests = int(f["requests"])
rps = float(f["rps"]) if "rps" in f else requests / (int(f["duration_us"]) / 1e6)
errors = int(f["status_errors"]) + int(f["socket_errors"])
(u0, s0), (u1, s1) = (map(int, t.split()) for t in (before, after))
user, sys_ = ((b - a) / int(hz) * 1e6 / requests for a, b in ((u0, u1), (s0, s1)))
print(f"{mode}\t{target}\t{run}\t{rps:.1f}\t{f['p50_us']}\t{f['p99_us']}\t{errors}\t{user:.1f}\t{sys_:.1f}")
PY
}

log "warming up"
for target in direct nginx hyper stackgate; do run_wrk h1 "$target" 0 2 >/dev/null; done

PERF_PID=""
for mode in $MODES; do
    for run in $(seq 1 "$RUNS"); do
        for target in $(targets_of "$mode"); do
            log "$mode $target run $run/$RUNS ($(cut -d' ' -f1-3 /proc/loadavg))"
            if [[ $PROFILE == 1 && $mode == h1 && $target == stackgate && $run == 1 ]]; then
                perf record -e cpu-clock -g -o "$OUT/stackgate.perf.data" -p "$SG_PID" -- sleep "$DURATION" 2>/dev/null &
                PERF_PID=$!
            fi
            before=$(cpu_ticks "$(pid_of "$target")")
            if [[ $mode == h2c ]]; then
                line=$(run_h2load "$target" "$run" "$DURATION")
            else
                line=$(run_wrk "$mode" "$target" "$run" "$DURATION")
            fi
            record "$mode" "$target" "$run" "$line" "$before" "$(cpu_ticks "$(pid_of "$target")")"
            if [[ -n $PERF_PID ]]; then
                wait "$PERF_PID" || true
                PERF_PID=""
            fi
        done
    done
done
RSS_AFTER=$(rss_kib "$SG_PID")

# --- report ---------------------------------------------------------------------
python3 - "$RESULTS" "$RSS_SMALL" "$RSS_LOADED" "$RSS_AFTER" "$TOKENS" "$LOAD_SECS" "$RSS_READY" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
rss_small, rss_loaded, rss_after, tokens = (int(x) for x in sys.argv[2:6])
rss_ready = int(sys.argv[7])
by = {}
for r in rows:
    by.setdefault((r["mode"], r["target"]), []).append(r)
med = lambda key, rs: statistics.median(float(r[key]) for r in rs)
print()
print("| mode | target | requests/s (median; min-max) | p50 | p99 | CPU per request, user + sys | errors |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for (mode, target), rs in by.items():
    rps = [float(r["rps"]) for r in rs]
    print(f"| {mode} | {target} | {med('rps', rs):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
          f"| {med('p50_us', rs) / 1000:.3f} ms | {med('p99_us', rs) / 1000:.3f} ms "
          f"| {med('user_us', rs):.1f} + {med('sys_us', rs):.1f} us "
          f"| {sum(int(r['errors']) for r in rs)} |")
print()
print("| mode | stackgate/nginx requests/s | stackgate/nginx p99 | added p99 over direct: stackgate / nginx | stackgate/nginx CPU per request | stackgate/hyper requests/s |")
print("| --- | --- | --- | --- | --- | --- |")
modes = []
for mode, _ in by:
    if mode not in modes:
        modes.append(mode)
for mode in modes:
    sg, ng, direct = by.get((mode, "stackgate")), by.get((mode, "nginx")), by.get((mode, "direct"))
    if not (sg and ng):
        continue
    added = "n/a (no direct run)"
    if direct:
        a_sg = med("p99_us", sg) - med("p99_us", direct)
        a_ng = med("p99_us", ng) - med("p99_us", direct)
        added = f"{a_sg / 1000:.3f} / {a_ng / 1000:.3f} ms = {a_sg / a_ng:.2f}x" if a_ng > 0 else "n/a"
    cpu = lambda rs: med("user_us", rs) + med("sys_us", rs)
    hy = by.get((mode, "hyper"))
    vs_hyper = f"{med('rps', sg) / med('rps', hy):.2f}" if hy and med('rps', hy) > 0 else "n/a"
    print(f"| {mode} | {med('rps', sg) / med('rps', ng):.2f} | "
          f"{med('p99_us', sg) / med('p99_us', ng):.2f} | {added} | {cpu(sg) / cpu(ng):.2f} | {vs_hyper} |")
print()
# The yardstick: stackgate against the bare hyper floor in the same runs.
pattern = {"h1": "random tokens of the registry", "h1-one": "one token for every request",
           "h1-c1": "random tokens, one connection", "h2c": "one token (h2load)", "tls": "random tokens"}
print("| mode | token pattern | CPU per request, stackgate / floor | stackgate/floor CPU per request | stackgate/floor requests/s |")
print("| --- | --- | --- | --- | --- |")
ratios = []
for mode in modes:
    sg, hy = by.get((mode, "stackgate")), by.get((mode, "hyper"))
    if not (sg and hy):
        continue
    cpu = lambda rs: med("user_us", rs) + med("sys_us", rs)
    print(f"| {mode} | {pattern.get(mode, '')} | {cpu(sg):.1f} / {cpu(hy):.1f} us "
          f"| {cpu(sg) / cpu(hy):.3f} | {med('rps', sg) / med('rps', hy):.3f} |")
    ratios.append(f"{mode} {cpu(sg) / cpu(hy):.3f}")
print()
if ratios:
    print("stackgate/floor CPU per request: " + ", ".join(ratios))
    print()
per_token = (rss_loaded - rss_small) * 1024 / (tokens - min(tokens, 1000))
ready_per_token = (rss_ready - rss_small) * 1024 / (tokens - min(tokens, 1000))
print(f"stackgate RSS: {rss_small / 1024:.1f} MiB with 1,000 tokens (after 3 s of load); with {tokens:,}: "
      f"{rss_ready / 1024:.1f} MiB when ready (loaded in {sys.argv[6]} s), {rss_loaded / 1024:.1f} MiB after 3 s of load, "
      f"{rss_after / 1024:.1f} MiB after all runs")
print(f"resident per token, against 1,000 tokens: {per_token:.0f} B after 3 s of load "
      f"({ready_per_token:.0f} B when just loaded)")
PY
echo
echo "raw results: $RESULTS"
