#!/usr/bin/env bash
# Stop and remove the three apps that ./scripts/up.sh started under root's PM2.
# PostgreSQL and RabbitMQ keep running; their data stays. Safe to run again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_DIR
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"

if ! command -v pm2 >/dev/null; then
  log "pm2 is not installed: nothing to stop"
  exit 0
fi
for app in api_gateway billing_app inventory_app; do
  if pm2 describe "$app" >/dev/null 2>&1; then
    log "pm2: deleting $app"
    pm2 delete "$app" >/dev/null
  fi
done
pm2 save --force >/dev/null
log "stopped; ./scripts/up.sh starts the stack again"
