#!/usr/bin/env bash
# Every check CI runs, in the order a reviewer would: formatting, lints, the
# unit and integration tests (fake CMA and fake origin on loopback), and the
# deployment kit. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The cluster tests (tests/cluster.rs) start their own redis-server on a free
# loopback port; install Debian's package when it is missing (as root only),
# without starting the system service.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing redis-server (tests/cluster.rs needs it)"
        export DEBIAN_FRONTEND=noninteractive
        policy=/usr/sbin/policy-rc.d
        created_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod +x "$policy"
            created_policy=1
        fi
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends redis-server >/dev/null
        if [ "$created_policy" = "1" ]; then rm -f "$policy"; fi
    else
        echo "redis-server is missing: install it (apt-get install redis-server) to run tests/cluster.rs" >&2
        exit 1
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo doc (no broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet
echo "== cargo test"
cargo test --locked
echo "== deploy kit"
bash deploy/validate.sh
