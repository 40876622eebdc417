#!/usr/bin/env bash
# `make run`: migrate, make sure the demo site exists, start the whole fleet in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
RK=.venv/bin/revkernel
export CRON_SECRET=${CRON_SECRET:-demo-cron-secret}
export AUTH_JWT_SECRET=${AUTH_JWT_SECRET:-demo-jwt-secret-that-is-at-least-32-bytes-long}
"$RK" migrate
if ! "$RK" plan set --site demo-site --monthly-limit 10000 >/dev/null 2>&1; then
  "$RK" site create --public-id demo-site --name "Demo site" --origin '*' --monthly-limit 10000 >/dev/null
fi
"$RK" member add --site demo-site --user demo-owner --role owner >/dev/null
port=${GATEWAY_PORT:-8080}
cat <<MSG

Revenue Kernel fleet starting (Ctrl-C stops it). Try:

  curl -s -i -X POST http://127.0.0.1:$port/api/sync -H 'Content-Type: application/json' \\
       -d '{"s":"demo-site","url":"https://example.com/","ec":"page","ea":"page_view"}'

  curl -s -H "Authorization: Bearer $CRON_SECRET" http://127.0.0.1:$port/api/cron/watchtower

MSG
exec "$RK" run
