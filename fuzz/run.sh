#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each): FUZZ_SECONDS=60 fuzz/run.sh
# Needs cargo-fuzz (installed here if missing). libFuzzer's instrumentation needs nightly rustc
# features; RUSTC_BOOTSTRAP lets the machine's stable toolchain provide them.
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-20}
for target in wire_codec native_message jupyter_frame; do
    echo "[fuzz] $target for ${seconds}s"
    cargo fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 3
done
