#!/usr/bin/env bash
# billing-vm: PostgreSQL with billing_db, RabbitMQ (two users, queues declared),
# then billing_app under root's PM2. Safe to run again (vagrant provision).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="${REPO_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
load_env "$REPO_DIR/.env"
require_env BILLING_DB_PORT BILLING_DB_NAME BILLING_DB_USER BILLING_DB_PASSWORD \
  RABBITMQ_HOST RABBITMQ_PORT RABBITMQ_QUEUE RABBITMQ_GATEWAY_USER RABBITMQ_GATEWAY_PASSWORD \
  RABBITMQ_BILLING_USER RABBITMQ_BILLING_PASSWORD GATEWAY_HOST

log "billing: provisioning in $REPO_DIR"
ensure_firewall "$RABBITMQ_HOST" "$RABBITMQ_PORT:$GATEWAY_HOST"
ensure_postgres
ensure_database "$BILLING_DB_USER" "$BILLING_DB_PASSWORD" "$BILLING_DB_NAME" \
  "$REPO_DIR/sql/billing_schema.sql" "$BILLING_DB_PORT"
ensure_rabbitmq
apt_install libpq5  # billing.py runs psycopg over the system libpq
ensure_venv billing "$(service_user billing)"
ensure_billing_rabbitmq
ensure_node_pm2
pm2_start_app billing_app
pm2_persist billing_app
log "billing: billing_app consumes $RABBITMQ_QUEUE on $RABBITMQ_HOST:$RABBITMQ_PORT"
