#!/usr/bin/env bash
# billing-vm: PostgreSQL with billing_db, RabbitMQ (two users, queues declared),
# then billing_app under root's PM2. Safe to run again (vagrant provision).
# In the cluster (CLUSTER=1) billing-vm-2 and billing-vm-3 run this too: a
# RabbitMQ node that joins billing-vm's, and billing_app on billing_db there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="${REPO_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
load_env "$REPO_DIR/.env"
apply_topology
require_env BILLING_DB_PORT BILLING_DB_NAME BILLING_DB_USER BILLING_DB_PASSWORD \
  RABBITMQ_HOST RABBITMQ_PORT RABBITMQ_QUEUE RABBITMQ_GATEWAY_USER RABBITMQ_GATEWAY_PASSWORD \
  RABBITMQ_BILLING_USER RABBITMQ_BILLING_PASSWORD GATEWAY_HOST

log "billing: provisioning in $REPO_DIR"
if is_cluster; then
  # This host's address among the billing hosts; the others are its peers.
  RABBITMQ_HOST="$(own_address "$BILLING_HOST" "$BILLING_2_HOST" "$BILLING_3_HOST")" ||
    die "this host has none of the billing hosts' addresses"
  rules=("$RABBITMQ_PORT:$GATEWAY_HOST")
  for peer in "$BILLING_HOST" "$BILLING_2_HOST" "$BILLING_3_HOST"; do
    [[ "$peer" != "$RABBITMQ_HOST" ]] || continue
    # AMQP (its billing_app), epmd and Erlang distribution (its RabbitMQ node).
    rules+=("$RABBITMQ_PORT:$peer" "4369:$peer" "$((RABBITMQ_PORT + 20000)):$peer")
    [[ "$RABBITMQ_HOST" != "$BILLING_HOST" ]] || rules+=("$BILLING_DB_PORT:$peer")
  done
  ensure_firewall "$RABBITMQ_HOST" "${rules[@]}"
else
  ensure_firewall "$RABBITMQ_HOST" "$RABBITMQ_PORT:$GATEWAY_HOST"
fi
if ! is_cluster || [[ "$RABBITMQ_HOST" == "$BILLING_HOST" ]]; then
  ensure_postgres "$(is_cluster && echo "$BILLING_HOST")"
  ensure_database "$BILLING_DB_USER" "$BILLING_DB_PASSWORD" "$BILLING_DB_NAME" \
    "$REPO_DIR/sql/billing_schema.sql" "$BILLING_DB_PORT"
  if is_cluster; then
    for client in "$BILLING_HOST" "$BILLING_2_HOST" "$BILLING_3_HOST"; do
      ensure_pg_hba "$BILLING_DB_USER" "$BILLING_DB_NAME" "$client"
    done
  fi
fi
ensure_rabbitmq
apt_install libpq5  # billing.py runs psycopg over the system libpq
ensure_venv billing "$(service_user billing)"
ensure_billing_rabbitmq
ensure_node_pm2
pm2_start_app billing_app
pm2_persist billing_app
ensure_cluster_queues
log "billing: billing_app consumes $RABBITMQ_QUEUE on ${RABBITMQ_HOSTS:-$RABBITMQ_HOST}:$RABBITMQ_PORT"
