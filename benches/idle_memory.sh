#!/usr/bin/env bash
# Memory per idle HTTP/1.1 keep-alive connection: stackgate against the bare
# hyper floor (examples/bare_proxy.rs) and nginx (when installed), one after
# another in the same run, everything on 127.0.0.1.
#
#   bash benches/idle_memory.sh
#   CONNS=2000 bash benches/idle_memory.sh
#
# For each target: its resident set (VmRSS) is read once it has served a few
# warm-up requests; then a Python client opens CONNS (8,000) connections one
# after another, sends one request on each (a valid token, for stackgate),
# reads the whole 200 answer and leaves the connection open; after a second's
# pause the RSS is read again. The figure is (after - before) / CONNS, which
# includes the server's share of everything a connection holds in userland:
# hyper's buffers, the connection task and its future, tokio's registration,
# stackgate's per-connection state. Kernel socket memory is not in RSS.
# The client closes every connection before the next target starts.
#
# What it starts (all stopped on exit): an nginx or Python origin answering
# `200 {"entries":[]}`, stackgate (release build, one token, idle and header
# timeouts long enough for the run), the bare proxy, nginx as a plain
# reverse proxy (one worker; its worker's RSS is counted).
#
# Needs: python3, curl, cargo; nginx optional. File descriptors: each server
# holds CONNS sockets and the client CONNS more, so `ulimit -n` must exceed
# CONNS + 100.
set -euo pipefail

CONNS=${CONNS:-8000}
BASE_PORT=${BASE_PORT:-18280}
P_ORIGIN=$BASE_PORT
P_SG=$((BASE_PORT + 1))
P_SG_ADMIN=$((BASE_PORT + 2))
P_HYPER=$((BASE_PORT + 3))
P_NGINX=$((BASE_PORT + 4))
API_KEY=blt0123456789abcdef
TOKEN=cs0123456789abcdef0123456789abcdef
REQ_PATH="/v3/content_types/blog_post/entries?environment=production&locale=en-us"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mktemp -d /tmp/stackgate-idle.XXXXXX)
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < CONNS + 100)); then
    echo "ulimit -n is $(ulimit -n); CONNS=$CONNS needs more" >&2
    exit 1
fi

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(cd "$ROOT" && cargo build --release --locked --quiet --bin stackgate --example bare_proxy)
BIN="$ROOT/target/release/stackgate"
BARE="$ROOT/target/release/examples/bare_proxy"

wait_for() { # url
    local i
    for i in $(seq 1 300); do
        curl -s -o /dev/null --max-time 1 -f "$1" && return 0
        sleep 0.1
    done
    echo "$1 did not come up" >&2
    exit 1
}

# The origin: a Python keep-alive server (threads; it holds one upstream
# connection per proxy, not per client).
cat >"$OUT/origin.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        # One write: a head and a body written apart meet Nagle and delayed
        # ACKs on the proxy's upstream connection (40 ms a request).
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: 14\r\n\r\n" + b'{"entries":[]}')
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$OUT/origin.py" "$P_ORIGIN" &
PIDS+=($!)
wait_for "http://127.0.0.1:$P_ORIGIN/"

cat >"$OUT/tokens.json" <<EOF
{"tokens": [{"uid": "blt0000000000000001", "name": "idle", "token": "$TOKEN",
  "type": "delivery",
  "scope": [{"module": "environment", "acl": {"read": true},
             "environments": [{"name": "production", "uid": "blt5f1c2a9e3d7b4c60"}]},
            {"module": "branch", "acl": {"read": true}, "branches": ["main"]}]}]}
EOF
cat >"$OUT/stackgate.toml" <<EOF
[listen]
http = "127.0.0.1:$P_SG"
admin = "127.0.0.1:$P_SG_ADMIN"

[server]
header_timeout = "600s"
idle_timeout = "600s"
max_connections = $((CONNS + 1000))

[[routes]]
kind = "delivery"
hosts = ["*"]
upstream = "http://127.0.0.1:$P_ORIGIN"

[[stacks]]
name = "idle"
api_key = "$API_KEY"

[stacks.registry]
tokens_file = "$OUT/tokens.json"
EOF

# The client: opens CONNS connections one after another, one request each,
# all left open until it reads a line on stdin.
cat >"$OUT/client.py" <<'PY'
import socket, sys
port, n, api_key, token, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
request = (f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\napi_key: {api_key}\r\n"
           f"access_token: {token}\r\nbranch: main\r\n\r\n").encode()
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed before the answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit("not a 200: " + head.split(b"\r\n")[0].decode())
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    held.append(s)
print("open", len(held), flush=True)
sys.stdin.readline()
PY

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# measure NAME PID PORT: prints "NAME before_kib after_kib bytes_per_conn"
measure() {
    local name=$1 pid=$2 port=$3 before after
    for _ in 1 2 3 4 5; do
        curl -s -o /dev/null -H "api_key: $API_KEY" -H "access_token: $TOKEN" -H "branch: main" \
            "http://127.0.0.1:$port$REQ_PATH"
    done
    sleep 1
    before=$(rss_kib "$pid")
    exec 5> >(python3 "$OUT/client.py" "$port" "$CONNS" "$API_KEY" "$TOKEN" "$REQ_PATH" >"$OUT/$name.client")
    local client=$!
    for _ in $(seq 1 1200); do
        grep -q '^open' "$OUT/$name.client" 2>/dev/null && break
        if ! kill -0 "$client" 2>/dev/null; then
            echo "$name: the client failed" >&2
            exit 1
        fi
        sleep 0.1
    done
    sleep 1
    after=$(rss_kib "$pid")
    echo >&5
    exec 5>&-
    wait "$client" 2>/dev/null || true
    python3 -c "import sys; b, a, n = map(int, sys.argv[1:]); print(f'$name {b} {a} {(a - b) * 1024 / n:.0f}')" \
        "$before" "$after" "$CONNS"
    sleep 1
}

RESULTS=()

RUST_LOG=warn "$BIN" run --config "$OUT/stackgate.toml" 2>"$OUT/stackgate.log" &
SG_PID=$!
PIDS+=("$SG_PID")
wait_for "http://127.0.0.1:$P_SG_ADMIN/readyz"
RESULTS+=("$(measure stackgate "$SG_PID" "$P_SG")")
kill "$SG_PID"

"$BARE" "127.0.0.1:$P_HYPER" "http://127.0.0.1:$P_ORIGIN" 2>/dev/null &
HYPER_PID=$!
PIDS+=("$HYPER_PID")
wait_for "http://127.0.0.1:$P_HYPER/"
RESULTS+=("$(measure floor "$HYPER_PID" "$P_HYPER")")
kill "$HYPER_PID"

if command -v nginx >/dev/null; then
    mkdir -p "$OUT/nginx/tmp"
    cat >"$OUT/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $((CONNS + 1000));
daemon off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections $((CONNS + 1000)); }
http {
    client_body_temp_path $OUT/nginx/tmp;
    proxy_temp_path $OUT/nginx/tmp;
    fastcgi_temp_path $OUT/nginx/tmp;
    uwsgi_temp_path $OUT/nginx/tmp;
    scgi_temp_path $OUT/nginx/tmp;
    access_log off;
    keepalive_timeout 600s;
    upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 16; }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    nginx -e "$OUT/nginx/error.log" -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" &
    NGINX_MASTER=$!
    PIDS+=("$NGINX_MASTER")
    wait_for "http://127.0.0.1:$P_NGINX/"
    NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)
    RESULTS+=("$(measure nginx "$NGINX_WORKER" "$P_NGINX")")
fi

echo
echo "RSS per idle HTTP/1.1 keep-alive connection ($CONNS connections, one request each)"
printf '%-10s %12s %12s %16s\n' target 'before KiB' 'after KiB' 'bytes per conn'
for line in "${RESULTS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-10s %12s %12s %16s\n' $line
done
