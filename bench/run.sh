#!/usr/bin/env bash
# `make bench` / `make bench-batch`: install wrk if missing, make sure the services answer, run the
# harness (bench/harness.py; arguments and BENCH_* variables are passed through, see bench/README.md).
# One bench at a time per machine (flock). The EXIT trap kills whatever process group the harness
# still lists in bench/out/.pids, so nothing it started outlives this script, even if the harness
# itself is killed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${BENCH_OUT:-bench/out}
PIDS="$OUT/.pids"

bash scripts/ensure_wrk.sh
if [ ! -x "$PY" ]; then
  echo "bench: $PY missing; run 'make install' first" >&2
  exit 2
fi
bash scripts/ensure_services.sh >&2

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  echo "bench: another bench is running on this machine (lock $OUT/.lock)" >&2
  exit 3
fi

cleanup() {
  local pgid
  [ -f "$PIDS" ] || return 0
  while read -r pgid; do
    [ -n "$pgid" ] || continue
    if kill -0 -- "-$pgid" 2>/dev/null; then
      echo "bench: killing leftover process group $pgid" >&2
      kill -KILL -- "-$pgid" 2>/dev/null || echo "bench: group $pgid already gone" >&2
    fi
  done <"$PIDS"
  rm -f "$PIDS"
}
trap cleanup EXIT

# In the background so that a signal reaches this script at once; the harness turns SIGTERM into an
# orderly teardown (stop servers, delete the vhost, drop rk_bench). A background job of a
# non-interactive shell ignores SIGINT, hence Ctrl-C is forwarded as SIGTERM.
"$PY" -m bench.harness "$@" &
harness=$!
trap 'kill -TERM "$harness" 2>/dev/null || true' INT TERM
status=0
wait "$harness" || status=$?
while kill -0 "$harness" 2>/dev/null; do
  wait "$harness" || status=$?
done
exit "$status"
