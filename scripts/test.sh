#!/usr/bin/env bash
# Every check CI runs, in the order a reviewer would: formatting, lints, the
# unit and integration tests (fake CMA and fake origin on loopback), and the
# deployment kit. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== deploy kit"
bash deploy/validate.sh
