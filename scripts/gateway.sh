#!/usr/bin/env bash
# gateway-vm: api_gateway under root's PM2 on GATEWAY_HOST:GATEWAY_PORT, with
# swagger-ui-dist for /docs. Safe to run again (vagrant provision).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="${REPO_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
load_env "$REPO_DIR/.env"
apply_topology
require_env GATEWAY_HOST GATEWAY_PORT INVENTORY_HOST INVENTORY_PORT \
  RABBITMQ_HOST RABBITMQ_PORT RABBITMQ_GATEWAY_USER RABBITMQ_GATEWAY_PASSWORD RABBITMQ_QUEUE

log "gateway: provisioning in $REPO_DIR"
ensure_firewall "$GATEWAY_HOST" "$GATEWAY_PORT"
apt_install curl
ensure_venv gateway "$(service_user gateway)"
ensure_node_pm2
# /docs serves node_modules/swagger-ui-dist (package-lock.json pins it). Install
# only when it is missing: npm ci would wipe a node_modules that is already there.
if [[ -f "$REPO_DIR/package-lock.json" && ! -d "$REPO_DIR/node_modules/swagger-ui-dist" ]]; then
  log "npm: installing package-lock.json into $REPO_DIR/node_modules"
  (cd "$REPO_DIR" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
pm2_start_app api_gateway
pm2_persist api_gateway

url="http://$GATEWAY_HOST:$GATEWAY_PORT/health"
for ((i = 0; i < 30; i++)); do
  if status="$(curl -s -o /dev/null -w "%{http_code}" "$url")" && [[ "$status" != 000 ]]; then
    log "gateway: $url answers $status"
    exit 0
  fi
  sleep 1
done
log "warning: $url does not answer yet; see: sudo pm2 logs api_gateway --lines 30"
