#!/usr/bin/env bash
# Tests of the Python SDK against a real kernelbox server (started by tests/conftest.py):
#   clients/python/run-tests.sh [pytest args...]
# Makes or reuses a venv keyed by requirements-test.txt, installs the SDK into it afresh,
# checks it with ruff and mypy --strict, then runs pytest. Environment: KERNELBOX_BIN (server
# binary, default target/debug/kernelbox, built if missing), KERNELBOX_SDK_BACKEND (local|docker).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin=$("$repo/tests/tools/ensure-venv.sh" sdk "$here/requirements-test.txt")

echo "=== install the SDK" >&2
rm -rf "$here/build"  # setuptools builds in the tree: no stale modules from an earlier build
"$bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall "$here"

cd "$here"
echo "=== ruff (format, lints)" >&2
"$bin/ruff" format --check --quiet src tests
"$bin/ruff" check --quiet src tests

echo "=== mypy --strict" >&2
"$bin/mypy" --strict src/kernelbox tests

echo "=== pytest" >&2
exec "$bin/python" -m pytest "$@"
