#!/usr/bin/env bash
# A py-spy profile of the product gateway under the bench load, for docs/performance.md.
#
#   bash bench/profile.sh                      # flamegraph SVG, single events
#   bash bench/profile.sh --batch 50           # batches of 50
#   PROFILE_FORMAT=speedscope bash bench/profile.sh   # open in https://www.speedscope.app
#   PROFILE_NATIVE=1 bash bench/profile.sh     # include C frames (uvloop, asyncpg, orjson)
#   PROFILE_RUN=half bash bench/profile.sh     # the run paced at half of the peak instead
#
# It runs the harness on the product alone (own database, vhost and Redis, as `make bench`): warm-up,
# then one peak run during which `py-spy record --subprocesses` samples the gateway leader and all
# its workers at 100 Hz over the sending window. The file lands in bench/out/profile-*.svg (or
# .speedscope.json); the run's table is printed as usual. BENCH_DURATION etc. apply.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
if [ ! -x "$(dirname "$PY")/py-spy" ]; then
  echo "profile: installing py-spy (the [bench] extra of pyproject.toml)" >&2
  "$PY" -m pip install -q -e '.[dev,bench]'
fi
half=0  # the harness reads PROFILE_RUN itself; the paced run only needs to exist
if [ "${PROFILE_RUN:-peak}" = "half" ]; then half=0.5; fi
args=(--targets product --runs 1 --half "$half" --profile "${PROFILE_FORMAT:-flamegraph}")
if [ "${PROFILE_NATIVE:-0}" = "1" ]; then
  args+=(--profile-native)
fi
exec bash bench/run.sh "${args[@]}" "$@"
