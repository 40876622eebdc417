#!/usr/bin/env bash
# Install wrk (the load generator of bench/ and of tests/integration/test_bench_load.py) if missing.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
echo "installing wrk (Debian package)" >&2
if [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
else
  sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null
fi
command -v wrk >/dev/null
