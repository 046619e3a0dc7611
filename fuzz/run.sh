#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 60).
# Inputs come from the committed seed corpus fuzz/corpus/<target>/ (read only,
# capped at ~200 small files) and the working corpus fuzz/target/corpus/<target>/
# (ignored by git), where new inputs are written. Crashes land in
# fuzz/artifacts/<target>/; keep each as fuzz/regressions/<target>/<name> with
# a unit test in the main crate that replays it.
#
# To refresh the seed corpus: `cargo fuzz cmin <target> target/corpus/<target>`,
# then copy at most ~200 small files into corpus/<target>/.
#
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. Usage: fuzz/run.sh [target...]
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(decision token_list config snapshot)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
status=0
for target in "${targets[@]}"; do
    mkdir -p "target/corpus/$target"
    echo "== $target: ${seconds}s"
    if ! cargo fuzz run "$target" "target/corpus/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=16384 -print_final_stats=1; then
        echo "== $target: crashed; see fuzz/artifacts/$target/" >&2
        status=1
    fi
done
exit "$status"
