#!/usr/bin/env bash
# Reproduces the README's performance table in one run (under 10 minutes on 2 vCPUs once the
# caches exist): builds the server in release mode, makes sure the kernel venv, the kernel image
# and Jupyter Kernel Gateway's venv exist (each cached; built on first use), then runs the suite.
# The report goes to stdout and target/bench/report.md. `QUICK=1` takes few samples;
# `SCENARIOS=relay,startup,scale` picks scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
patches/apply.sh
cargo build --release --quiet
./target/release/kernelbox setup >/dev/null
kernel-image/build.sh >/dev/null
gateway_bin=$(tests/tools/ensure-venv.sh gateway benches/gateway/requirements.txt)
export GATEWAY_PYTHON="$gateway_bin/python"
export KERNELBOX_BIN="$PWD/target/release/kernelbox"
exec cargo bench --quiet --bench suite
