#!/usr/bin/env bash
# The whole stack on this machine: the provisioning of the three VMs run here at
# once, every address 127.0.0.1, the three apps under root's PM2 with the same
# names as on the VMs. Safe to run again; ./scripts/down.sh stops the apps.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_DIR
export GATEWAY_HOST=127.0.0.1 INVENTORY_HOST=127.0.0.1 BILLING_HOST=127.0.0.1 RABBITMQ_HOST=127.0.0.1
# PM2 applies the env_local block of ecosystem.config.js (the same addresses).
export PM2_ENV=local
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"
load_env "$REPO_DIR/.env"
require_env GATEWAY_PORT INVENTORY_PORT INVENTORY_DB_NAME BILLING_DB_NAME RABBITMQ_QUEUE
port="${GATEWAY_PORT:?}"

[[ "$(id -u)" == 0 ]] || die "run as root (the apps run under root's PM2): sudo $0"
# The apps run as the movie-* users: they must reach the clone, even in a home.
open_path_to_services "$REPO_DIR"

"$REPO_DIR/scripts/inventory.sh"
"$REPO_DIR/scripts/billing.sh"
"$REPO_DIR/scripts/gateway.sh"

# .env is now root's (0640): its owner before, the clone's, may still read it
# (vagrant and hosts.sh read it as that user).
owner="$(stat -c %U "$REPO_DIR")"
if [[ "$owner" != root ]]; then
  apt_install acl
  log "users: $owner, the clone's owner, may read .env (ACL u:$owner:r)"
  setfacl -m "u:$owner:r" "$REPO_DIR/.env"
fi

url="http://$GATEWAY_HOST:$port/health"
log "waiting for $url to answer 200"
status=000
for ((i = 0; i < 60; i++)); do
  status="$(curl -s -o /dev/null -w "%{http_code}" "$url" || true)"
  [[ "$status" == 200 ]] && break
  sleep 1
done
if [[ "$status" != 200 ]]; then
  curl -s "$url" || true
  echo
  pm2 list
  for app in inventory_app billing_app api_gateway; do
    pm2 logs "$app" --nostream --lines 30 || true
  done
  die "$url answered $status instead of 200 after 60 s"
fi

base="http://$GATEWAY_HOST:$port"
# Every hint below works when pasted on this machine by a user with sudo rights.
cat <<TEXT

The stack is up: $(curl -s "$url")
  gateway    $base (docs: $base/docs)
  inventory  http://$INVENTORY_HOST:${INVENTORY_PORT:?}/api/movies
  databases  $INVENTORY_DB_NAME, $BILLING_DB_NAME
  queue      $RABBITMQ_QUEUE

Try it (on this machine):
  curl -i -X POST $base/api/movies/ -H 'Content-Type: application/json' \\
    -d '{"title": "A new movie", "description": "Very short description"}'
  curl -i $base/api/movies/
  curl -i -X POST $base/api/billing/ -H 'Content-Type: application/json' \\
    -d '{"user_id": "20", "number_of_items": "99", "total_amount": "250"}'
  sudo -i -u postgres psql -d $BILLING_DB_NAME -c 'TABLE orders;'
  sudo rabbitmqctl list_queues name messages consumers

The apps run under root's PM2, hence sudo:
  sudo pm2 list
  sudo pm2 logs api_gateway --lines 20 --nostream
  sudo pm2 stop billing_app
  sudo pm2 start billing_app

Stop the apps:                 sudo ./scripts/down.sh
Remove everything up.sh made:  sudo ./scripts/down.sh --purge
TEXT
