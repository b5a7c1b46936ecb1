#!/usr/bin/env bash
# inventory-vm: PostgreSQL with movies_db, then inventory_app under root's PM2,
# listening on INVENTORY_HOST:INVENTORY_PORT. Safe to run again (vagrant provision).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="${REPO_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
load_env "$REPO_DIR/.env"
require_env INVENTORY_HOST INVENTORY_PORT INVENTORY_DB_PORT GATEWAY_HOST \
  INVENTORY_DB_NAME INVENTORY_DB_USER INVENTORY_DB_PASSWORD

log "inventory: provisioning in $REPO_DIR"
ensure_firewall "$INVENTORY_HOST" "$INVENTORY_PORT:$GATEWAY_HOST"
ensure_postgres
ensure_database "$INVENTORY_DB_USER" "$INVENTORY_DB_PASSWORD" "$INVENTORY_DB_NAME" \
  "$REPO_DIR/sql/inventory_schema.sql" "$INVENTORY_DB_PORT"
ensure_venv inventory "$(service_user inventory)"
ensure_node_pm2
pm2_start_app inventory_app
pm2_persist inventory_app
log "inventory: inventory_app on http://$INVENTORY_HOST:$INVENTORY_PORT/api/movies"
