#!/usr/bin/env bash
# inventory-vm: PostgreSQL with movies_db, then inventory_app under root's PM2,
# listening on INVENTORY_HOST:INVENTORY_PORT. Safe to run again (vagrant provision).
# In the cluster (CLUSTER=1) inventory-vm-2 runs this too: inventory_app on
# its own address, on movies_db of inventory-vm.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="${REPO_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
load_env "$REPO_DIR/.env"
apply_topology
require_env INVENTORY_HOST INVENTORY_PORT INVENTORY_DB_PORT GATEWAY_HOST \
  INVENTORY_DB_NAME INVENTORY_DB_USER INVENTORY_DB_PASSWORD

log "inventory: provisioning in $REPO_DIR"
primary="$INVENTORY_HOST"
if is_cluster; then
  # This host's address: inventory_app listens there.
  INVENTORY_HOST="$(own_address "$INVENTORY_HOST" "$INVENTORY_2_HOST")" ||
    die "this host has none of the inventories' addresses"
  export INVENTORY_HOST
fi
rules=("$INVENTORY_PORT:$GATEWAY_HOST")
if is_cluster && [[ "$INVENTORY_HOST" == "$primary" ]]; then
  rules+=("$INVENTORY_DB_PORT:$INVENTORY_2_HOST")
fi
ensure_firewall "$INVENTORY_HOST" "${rules[@]}"
if [[ "$INVENTORY_HOST" == "$primary" ]]; then
  ensure_postgres "$(is_cluster && echo "$primary")"
  ensure_database "$INVENTORY_DB_USER" "$INVENTORY_DB_PASSWORD" "$INVENTORY_DB_NAME" \
    "$REPO_DIR/sql/inventory_schema.sql" "$INVENTORY_DB_PORT"
  if is_cluster; then
    for client in "$primary" "$INVENTORY_2_HOST"; do
      ensure_pg_hba "$INVENTORY_DB_USER" "$INVENTORY_DB_NAME" "$client"
    done
  fi
fi
ensure_venv inventory "$(service_user inventory)"
ensure_node_pm2
pm2_start_app inventory_app
pm2_persist inventory_app
log "inventory: inventory_app on http://$INVENTORY_HOST:$INVENTORY_PORT/api/movies"
