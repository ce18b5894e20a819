#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each): FUZZ_SECONDS=60 fuzz/run.sh
# Needs cargo-fuzz (installed here if missing). libFuzzer's instrumentation needs nightly rustc
# features; RUSTC_BOOTSTRAP lets the machine's stable toolchain provide them.
# Built without a sanitizer (the fuzzed code has no unsafe blocks; AddressSanitizer doubled the build) in
# the dev profile at opt-level 1 (fuzz/Cargo.toml): ~3.5 min to build on 2 cores instead of ~7,
# and some 40,000 runs a second.
set -euo pipefail
cd "$(dirname "$0")"
../patches/apply.sh
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-20}
for target in wire_codec native_message jupyter_frame; do
    echo "[fuzz] $target for ${seconds}s"
    cargo fuzz run -s none --dev "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 3
done
