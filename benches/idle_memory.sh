#!/usr/bin/env bash
# Memory per idle keep-alive connection, HTTP/1.1 and h2c: stackgate against
# the bare hyper floor (examples/bare_proxy.rs) and nginx (when installed),
# one after another in the same run, everything on 127.0.0.1; each target is
# started afresh for each protocol.
#
#   bash benches/idle_memory.sh
#   CONNS=2000 PROTOS=h2 bash benches/idle_memory.sh
#
# For each target: its resident set (VmRSS) is read once it has served a few
# warm-up requests; then a Python client opens CONNS (8,000) connections one
# after another, sends one request on each (a valid token, for stackgate),
# reads the whole 200 answer and leaves the connection open; after SETTLE
# seconds the RSS is read again. The figure is (after - before) / CONNS, which
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
P_NGINX_H2=$((BASE_PORT + 5))
PROTOS=${PROTOS:-h1 h2}
# Seconds between the last connection's answer and the reading: stackgate
# parks an idle HTTP/1.1 connection 100-200 ms after its last request
# (server::PARK_AFTER).
SETTLE=${SETTLE:-3}
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
# all left open until it reads a line on stdin. `h1`: HTTP/1.1 keep-alive;
# `h2`: h2c with prior knowledge (the preface, an empty SETTINGS, the
# server's SETTINGS acknowledged, one GET on stream 1 in plain HPACK
# literals), read until the answer's END_STREAM.
cat >"$OUT/client.py" <<'PY'
import socket, struct, sys
proto, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
api_key, token, path = sys.argv[4], sys.argv[5], sys.argv[6]

def recv_exact(s, k):
    data = b""
    while len(data) < k:
        chunk = s.recv(k - len(data))
        if not chunk:
            sys.exit("connection closed before the answer")
        data += chunk
    return data

def h1(s):
    s.sendall((f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\napi_key: {api_key}\r\n"
               f"access_token: {token}\r\nbranch: main\r\n\r\n").encode())
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

def literal(name, value, index=None):
    # Literal without indexing: a new name (index 0) or an indexed one.
    def string(b):
        assert len(b) < 127
        return bytes([len(b)]) + b
    head = bytes([index]) if index else b"\x00" + string(name)
    return head + string(value)

def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

BLOCK = (b"\x82\x86"  # :method GET, :scheme http
         + literal(b":path", path.encode(), 4) + literal(b":authority", b"127.0.0.1", 1)
         + literal(b"api_key", api_key.encode()) + literal(b"access_token", token.encode())
         + literal(b"branch", b"main"))

def h2(s):
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
              + frame(1, 0x5, 1, BLOCK))  # HEADERS, END_STREAM | END_HEADERS
    status_ok = False
    while True:
        length, kind, flags, stream = struct.unpack(">I", b"\x00" + recv_exact(s, 3))[0], *recv_exact(s, 2), \
            struct.unpack(">I", recv_exact(s, 4))[0] & 0x7fffffff
        payload = recv_exact(s, length)
        if kind == 4 and not flags & 1:  # the server's SETTINGS: acknowledge
            s.sendall(frame(4, 1, 0, b""))
        elif kind == 7:
            sys.exit("GOAWAY")
        elif kind == 3 and stream == 1:
            sys.exit("the stream was reset")
        elif kind == 1 and stream == 1:
            status_ok = payload[:1] == b"\x88"  # :status 200, indexed
            if not status_ok:
                sys.exit("not a 200")
        if stream == 1 and kind in (0, 1) and flags & 1:
            return

held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    h1(s) if proto == "h1" else h2(s)
    held.append(s)
print("open", len(held), flush=True)
sys.stdin.readline()
PY

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# measure NAME PID PORT PROTO: prints "NAME PROTO before_kib after_kib bytes_per_conn"
measure() {
    local name=$1 pid=$2 port=$3 proto=$4 before after
    for _ in 1 2 3 4 5; do
        curl -s -o /dev/null -H "api_key: $API_KEY" -H "access_token: $TOKEN" -H "branch: main" \
            "http://127.0.0.1:$port$REQ_PATH"
    done
    sleep 1
    before=$(rss_kib "$pid")
    exec 5> >(python3 "$OUT/client.py" "$proto" "$port" "$CONNS" "$API_KEY" "$TOKEN" "$REQ_PATH" >"$OUT/$name.client")
    local client=$!
    for _ in $(seq 1 1200); do
        grep -q '^open' "$OUT/$name.client" 2>/dev/null && break
        if ! kill -0 "$client" 2>/dev/null; then
            echo "$name: the client failed" >&2
            exit 1
        fi
        sleep 0.1
    done
    sleep "$SETTLE"
    after=$(rss_kib "$pid")
    echo >&5
    exec 5>&-
    wait "$client" 2>/dev/null || true
    python3 -c "import sys; b, a, n = map(int, sys.argv[1:]); print(f'$name $proto {b} {a} {(a - b) * 1024 / n:.0f}')" \
        "$before" "$after" "$CONNS"
    sleep 1
}

RESULTS=()
for proto in $PROTOS; do
    RUST_LOG=warn "$BIN" run --config "$OUT/stackgate.toml" 2>"$OUT/stackgate.log" &
    SG_PID=$!
    PIDS+=("$SG_PID")
    wait_for "http://127.0.0.1:$P_SG_ADMIN/readyz"
    RESULTS+=("$(measure stackgate "$SG_PID" "$P_SG" "$proto")")
    kill "$SG_PID"
    wait "$SG_PID" 2>/dev/null || true

    "$BARE" "127.0.0.1:$P_HYPER" "http://127.0.0.1:$P_ORIGIN" 2>/dev/null &
    HYPER_PID=$!
    PIDS+=("$HYPER_PID")
    wait_for "http://127.0.0.1:$P_HYPER/"
    RESULTS+=("$(measure floor "$HYPER_PID" "$P_HYPER" "$proto")")
    kill "$HYPER_PID"
    wait "$HYPER_PID" 2>/dev/null || true
done

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
        # h2c with prior knowledge
        listen 127.0.0.1:$P_NGINX_H2 http2;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    for proto in $PROTOS; do
        nginx -e "$OUT/nginx/error.log" -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" &
        NGINX_MASTER=$!
        PIDS+=("$NGINX_MASTER")
        wait_for "http://127.0.0.1:$P_NGINX/"
        NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)
        port=$P_NGINX
        [ "$proto" = h2 ] && port=$P_NGINX_H2
        RESULTS+=("$(measure nginx "$NGINX_WORKER" "$port" "$proto")")
        kill "$NGINX_MASTER"
        wait "$NGINX_MASTER" 2>/dev/null || true
    done
fi

echo
echo "RSS per idle keep-alive connection ($CONNS connections, one request each)"
printf '%-10s %-6s %12s %12s %16s\n' target proto 'before KiB' 'after KiB' 'bytes per conn'
for line in "${RESULTS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-10s %-6s %12s %12s %16s\n' $line
done
