#!/usr/bin/env bash
# Stop and remove the three apps that ./scripts/up.sh started under root's PM2.
# PostgreSQL and RabbitMQ keep running; their data stays. Safe to run again.
#
#   sudo ./scripts/down.sh --purge
# also removes everything else up.sh left on this machine: the databases of
# the roles from .env (the stack's, and the copies the tests and the benchmark
# made) and the roles, their pg_hba.conf lines, conf.d/50-movie-shop.conf, the
# RabbitMQ user and queue from .env, venv/, logs/ and node_modules/ (on a VM:
# where vm.env puts them), the logrotate rules, the ACL entries up.sh added on
# the directories above the clone, and, when no other app is left in root's
# PM2, the PM2 daemon, its home and the pm2-root boot service. It leaves the
# packages installed (docs/operations.md: "Before you start").
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_DIR
own_paths="${VENV_ROOT:-}${LOG_DIR:-}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"

case "${1:-}" in
  "") purge=0 ;;
  --purge) purge=1 ;;
  *) die "usage: sudo $0 [--purge]" ;;
esac
[[ "$(id -u)" == 0 ]] || die "run as root (the apps run under root's PM2): sudo $0 $*"
load_env "$REPO_DIR/.env"

# vm_setting NAME: NAME's value in vm.env, whatever the environment holds.
vm_setting() {
  local file="$REPO_DIR/vm.env"
  (
    unset "$1"
    load_env "$file"
    printf '%s\n' "${!1:-}"
  )
}

# On a VM (this clone is vm.env's REPO_DIR) the virtualenvs and logs are where
# vm.env put them, unless the environment says otherwise.
if [[ -z "$own_paths" && "$(vm_setting REPO_DIR)" == "$REPO_DIR" ]]; then
  VENV_ROOT="$(vm_setting VENV_ROOT)"
  LOG_DIR="$(vm_setting LOG_DIR)"
fi

# purge_pm2: the daemon, its home and its boot service, if no other app uses them.
purge_pm2() {
  if [[ "$(pm2 jlist 2>/dev/null)" != "[]" ]]; then
    log "pm2: other apps remain in $PM2_HOME; keeping the daemon and pm2-root"
    return 0
  fi
  if is_systemd && systemctl cat pm2-root >/dev/null 2>&1; then
    log "pm2: removing the pm2-root boot service"
    pm2 unstartup systemd -u root --hp "$(dirname "$PM2_HOME")" >/dev/null
    restore_file /etc/systemd/system/pm2-root.service.d/movie-shop.conf
    rmdir /etc/systemd/system/pm2-root.service.d 2>/dev/null || true
    systemctl daemon-reload
  fi
  log "pm2: stopping the daemon, removing $PM2_HOME"
  pm2 kill >/dev/null
  rm -rf -- "$PM2_HOME"
}

# purge_postgres: every database the two roles own, the roles, their pg_hba lines.
purge_postgres() {
  local role db hba rules=() found
  command -v pg_lsclusters >/dev/null || return 0
  start_postgres
  for role in "$INVENTORY_DB_USER" "$BILLING_DB_USER"; do
    require_identifier "$role"
    while read -r db; do
      [[ -n "$db" ]] || continue
      log "postgresql: dropping database $db (owned by $role)"
      psql_admin -d postgres -c "DROP DATABASE \"$db\" WITH (FORCE)"
    done < <(psql_admin -At -c "SELECT datname FROM pg_database d
      JOIN pg_roles r ON r.oid = d.datdba WHERE r.rolname = '$role'")
    if [[ -n "$(psql_admin -At -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" ]]; then
      # Objects or grants the role still has in other databases go first.
      while read -r db; do
        psql_admin -d "$db" -c "DROP OWNED BY $role"
      done < <(psql_admin -At -c "SELECT datname FROM pg_database WHERE datallowconn")
      log "postgresql: dropping role $role"
      psql_admin -d postgres -c "DROP ROLE $role"
    fi
  done
  rules=("host    $INVENTORY_DB_NAME    $INVENTORY_DB_USER    127.0.0.1/32    scram-sha-256"
    "host    $BILLING_DB_NAME    $BILLING_DB_USER    127.0.0.1/32    scram-sha-256")
  hba="$(psql_admin -At -c "SHOW hba_file")"
  found="$(grep -cxF -e "${rules[0]}" -e "${rules[1]}" "$hba" || true)"
  if ((found > 0)); then
    log "postgresql: removing $found line(s) of $hba"
    # Each rule came with one identical comment line: drop as many of those.
    awk -v a="${rules[0]}" -v b="${rules[1]}" -v n="$found" '
      $0 == a || $0 == b { next }
      n > 0 && $0 == "# movie-shop: the service logs in with the password from .env" { n--; next }
      { print }
    ' "$hba" >"$hba.movie-shop.tmp"
    cat "$hba.movie-shop.tmp" >"$hba"  # cat keeps the file's owner and mode
    rm -f "$hba.movie-shop.tmp"
    psql_admin -At -c "SELECT pg_reload_conf()" >/dev/null
  fi
  restore_file /etc/postgresql/*/main/conf.d/50-movie-shop.conf
}

# purge_rabbitmq: the queue pair and the two users from .env (never guest).
purge_rabbitmq() {
  local queue user
  command -v rabbitmqctl >/dev/null && rabbitmq_running || return 0
  for queue in "$RABBITMQ_QUEUE" "$RABBITMQ_QUEUE.dead"; do
    # Deleted whether or not a listing shows it (one taken while its last
    # consumer goes away can miss it); one that is not there is no error.
    if rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1; then
      log "rabbitmq: deleted queue $queue"
    fi
  done
  for user in "$RABBITMQ_GATEWAY_USER" "$RABBITMQ_BILLING_USER"; do
    if [[ "$user" != guest ]] &&
      rabbitmqctl -q list_users | cut -f1 | grep -qxF -- "$user"; then
      log "rabbitmq: deleting user $user"
      rabbitmqctl -q delete_user "$user" >/dev/null
    fi
  done
  if grep -qs "Managed by scripts/billing.sh" /etc/rabbitmq/rabbitmq.conf; then
    restore_file /etc/rabbitmq/rabbitmq.conf
    if is_systemd; then
      systemctl restart rabbitmq-server
    fi
  fi
}

# purge_logrotate: the logs' rotation rules, and the services' restart drop-ins
# (where systemd runs).
purge_logrotate() {
  local unit
  restore_file /etc/logrotate.d/movie-shop /etc/systemd/system/logrotate.timer.d/movie-shop.conf
  rmdir /etc/systemd/system/logrotate.timer.d 2>/dev/null || true
  for unit in postgresql@ rabbitmq-server; do
    restore_file "/etc/systemd/system/$unit.service.d/movie-shop.conf"
    rmdir "/etc/systemd/system/$unit.service.d" 2>/dev/null || true
  done
  if is_systemd; then
    systemctl daemon-reload
  fi
}

# restore_file PATH...: put back PATH.orig that write_file saved, or remove PATH.
restore_file() {
  local path
  for path in "$@"; do
    [[ -f "$path" ]] || continue
    if [[ -f "$path.orig" ]]; then
      log "restoring $path from $path.orig"
      mv -f -- "$path.orig" "$path"
    else
      log "removing $path"
      rm -f -- "$path"
    fi
  done
}

if command -v pm2 >/dev/null; then
  for app in api_gateway billing_app inventory_app; do
    if pm2 describe "$app" >/dev/null 2>&1; then
      log "pm2: deleting $app"
      pm2 delete "$app" >/dev/null
    fi
  done
  pm2 save --force >/dev/null
  if ((purge)); then
    purge_pm2
  fi
else
  log "pm2 is not installed: no app to stop"
fi
if ((purge == 0)); then
  log "stopped; sudo ./scripts/up.sh starts the stack again"
  exit 0
fi

require_env INVENTORY_DB_NAME INVENTORY_DB_USER BILLING_DB_NAME BILLING_DB_USER \
  RABBITMQ_GATEWAY_USER RABBITMQ_BILLING_USER RABBITMQ_QUEUE
purge_postgres
purge_rabbitmq
purge_logrotate
close_path_to_services "$REPO_DIR"
if [[ -f "$REPO_DIR/.env" ]]; then
  log "giving .env back to the clone's owner, mode 0644"
  if command -v setfacl >/dev/null; then
    setfacl -b "$REPO_DIR/.env"
  fi
  chown "$(stat -c %U:%G "$REPO_DIR")" "$REPO_DIR/.env"
  chmod 0644 "$REPO_DIR/.env"
fi
for dir in "$VENV_ROOT" "$LOG_DIR" "$REPO_DIR/node_modules"; do
  if [[ -d "$dir" && "$dir" == /?*/* ]]; then
    log "removing $dir"
    rm -rf -- "$dir"
  fi
done
# What tests run as root left in a user's clone: caches the user cannot delete.
if [[ "$(stat -c %U "$REPO_DIR")" != root ]]; then
  while IFS= read -r -d "" dir; do
    log "removing $dir (root's)"
    rm -rf -- "$dir"
  done < <(find "$REPO_DIR" -xdev -user root -type d \( -name __pycache__ -o \
    -name .pytest_cache -o -name .hypothesis -o -name .ruff_cache -o -name .schemathesis \) \
    -prune -print0)
fi
log "purged; left installed: postgresql, rabbitmq-server, nodejs, npm, pm2 (docs/operations.md)"
