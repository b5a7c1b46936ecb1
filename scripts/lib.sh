#!/usr/bin/env bash
# Shared functions for the provisioning scripts (inventory.sh, billing.sh,
# gateway.sh, up.sh, down.sh). Sourced, never run on its own.
#
# Settings come from the environment first (Vagrant passes .env to each VM's
# provisioner; ./scripts/up.sh overrides the addresses with 127.0.0.1) and
# then from .env, which never overrides a variable that is already set.
#
# Paths, all overridable from the environment:
#   REPO_DIR   the repository (on the VMs: /vagrant, the synced folder)
#   VENV_ROOT  one virtualenv per service in $VENV_ROOT/<service> (default: $REPO_DIR/venv)
#   LOG_DIR    PM2 log files (default: $REPO_DIR/logs)
#   PM2_ENV    extra environment block of ecosystem.config.js, e.g. "local"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="${REPO_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
VENV_ROOT="${VENV_ROOT:-$REPO_DIR/venv}"
LOG_DIR="${LOG_DIR:-$REPO_DIR/logs}"
PM2_VERSION="7.0.4"
export REPO_DIR VENV_ROOT LOG_DIR

# The audit runs `sudo pm2 ...`: always use root's PM2 home, whatever HOME is.
PM2_HOME="${PM2_HOME:-$(getent passwd "$(id -un)" | cut -d: -f6)/.pm2}"
export PM2_HOME

# --- Messages ---

log() {
  printf '==> %s\n' "$*"
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# --- Settings ---

# load_env [FILE]: export the settings of FILE (default .env) that the
# environment does not set yet. The grammar is python-dotenv's, which the
# services use, narrowed so that this function, the Vagrantfile's read_env and
# the services read every line alike (docs/operations.md, "Settings"); a line outside it
# stops with its number rather than be read another way.
load_env() {
  local file="${1:-$REPO_DIR/.env}" line number=0 name
  local -A values=()
  [[ -f "$file" ]] || return 0
  if grep -qaP '\x00' "$file"; then
    die "$file: a NUL byte"
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    number=$((number + 1))
    env_line "${line%$'\r'}" || die "$file line $number: $ENV_ERROR"
    [[ -n "$ENV_NAME" ]] && values[$ENV_NAME]="$ENV_VALUE"
  done <"$file"
  for name in "${!values[@]}"; do
    [[ -n "${!name+x}" ]] || export "$name=${values[$name]}"
  done
}

# env_line LINE: set ENV_NAME and ENV_VALUE from one .env line (ENV_NAME empty
# for a comment, a blank line or a name without '='); false with ENV_ERROR set
# for a line outside the grammar.
env_line() {
  local LC_ALL=C line="$1" rest quote not_text=$'[^\t[:print:]]'
  ENV_NAME="" ENV_VALUE="" ENV_ERROR=""
  [[ "$line" =~ ^[[:blank:]]*(#|$) ]] && return 0
  if [[ "$line" =~ $not_text ]]; then
    ENV_ERROR="only printable ASCII and tabs are allowed (a lone CR, a non-ASCII byte?)"
    return 1
  fi
  if [[ "$line" == *"\${"* ]]; then
    ENV_ERROR="'\${' is not supported (python-dotenv would expand it)"
    return 1
  fi
  [[ "$line" =~ ^[[:blank:]]*(export[[:blank:]]+)?(.*)$ ]]
  if [[ ! "${BASH_REMATCH[2]}" =~ ^([A-Za-z_][A-Za-z0-9_]*)[[:blank:]]*(.*)$ ]]; then
    ENV_ERROR="expected NAME=value"
    return 1
  fi
  rest="${BASH_REMATCH[2]}"
  [[ -z "$rest" || "$rest" == "#"* ]] && return 0  # a name alone: no value
  if [[ "$rest" != "="* ]]; then
    ENV_ERROR="expected NAME=value"
    return 1
  fi
  ENV_NAME="${BASH_REMATCH[1]}"
  rest="${rest#=}"
  [[ "$rest" =~ ^[[:blank:]]+# ]] && return 0  # NAME= # comment: empty
  rest="${rest#"${rest%%[![:blank:]]*}"}"
  quote="${rest:0:1}"
  if [[ "$quote" == "'" || "$quote" == '"' ]]; then
    # Inside quotes a backslash escapes only a backslash or that quote.
    local re="^${quote}(([^${quote}\\\\]|\\\\[${quote}\\\\])*)${quote}[[:blank:]]*(#.*)?\$"
    if [[ ! "$rest" =~ $re ]]; then
      ENV_ERROR="unclosed quote, text after it, or a backslash escape other than \\\\ and \\$quote"
      return 1
    fi
    rest="${BASH_REMATCH[1]}"
    while [[ "$rest" == *\\* ]]; do
      ENV_VALUE+="${rest%%\\*}"
      rest="${rest#*\\}"
      ENV_VALUE+="${rest:0:1}"
      rest="${rest:1}"
    done
    ENV_VALUE+="$rest"
  else
    # Unquoted: a comment starts at the first '#' after a blank; blanks at the end go.
    rest="${rest%%[[:blank:]]#*}"
    ENV_VALUE="${rest%"${rest##*[![:blank:]]}"}"
  fi
}

# require_env NAME...: stop with the list of settings that are empty or unset.
require_env() {
  local name missing=()
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  ((${#missing[@]} == 0)) || die "missing settings (set them in .env): ${missing[*]}"
}

# --- Topology ---

# is_cluster: CLUSTER=1, the topology with billing-vm-2, billing-vm-3 and inventory-vm-2.
is_cluster() {
  [[ "${CLUSTER:-0}" == 1 ]]
}

# apply_topology: in the cluster, what the services need to find each other:
# the RabbitMQ nodes and inventories in turn, a quorum queue, and each
# database on its host's private address, over TLS (Debian's PostgreSQL has a
# certificate from its install). Nothing changes without CLUSTER=1.
apply_topology() {
  is_cluster || return 0
  require_env BILLING_HOST BILLING_2_HOST BILLING_3_HOST INVENTORY_HOST INVENTORY_2_HOST \
    RABBITMQ_CLUSTER_COOKIE
  # shellcheck disable=SC2153  # require_env just checked them
  export RABBITMQ_HOSTS="$BILLING_HOST,$BILLING_2_HOST,$BILLING_3_HOST"
  # shellcheck disable=SC2153
  export INVENTORY_HOSTS="$INVENTORY_HOST,$INVENTORY_2_HOST"
  export RABBITMQ_QUEUE_TYPE=quorum
  export BILLING_DB_HOST="$BILLING_HOST" BILLING_DB_SSLMODE=require
  export INVENTORY_DB_HOST="$INVENTORY_HOST" INVENTORY_DB_SSLMODE=require
}

# own_address ADDRESS...: the first ADDRESS that is one of this machine's.
own_address() {
  local address
  for address in "$@"; do
    if ip -o -4 addr show | grep -qF " inet $address/"; then
      printf '%s\n' "$address"
      return 0
    fi
  done
  return 1
}

# require_identifier VALUE: role and database names are used unquoted in SQL.
require_identifier() {
  [[ "$1" =~ ^[a-z_][a-z0-9_]*$ ]] || die "'$1' is not a plain lower-case SQL name"
}

is_loopback() {
  [[ "$1" == 127.* || "$1" == localhost || "$1" == ::1 ]]
}

# is_systemd: true on the VMs, false in containers such as CI.
is_systemd() {
  [[ -d /run/systemd/system && "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]
}

# --- Packages ---

# apt_install PACKAGE...: install the packages that are missing, nothing else.
apt_install() {
  local pkg status missing=()
  for pkg in "$@"; do
    # shellcheck disable=SC2016  # ${db:Status-Status} is a dpkg-query format
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == installed ]] || missing+=("$pkg")
  done
  ((${#missing[@]} > 0)) || return 0
  log "apt: installing ${missing[*]}"
  if [[ -z "${APT_UPDATED:-}" ]]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_node_pm2: Node.js and npm from Debian if there are none, PM2 from npm.
ensure_node_pm2() {
  if ! command -v node >/dev/null; then
    apt_install nodejs
  fi
  if ! command -v npm >/dev/null; then
    apt_install npm
  fi
  if ! command -v pm2 >/dev/null; then
    log "npm: installing pm2@$PM2_VERSION"
    npm install --global --no-audit --no-fund --loglevel=error "pm2@$PM2_VERSION"
  fi
}

# ensure_venv SERVICE [USER]: $VENV_ROOT/SERVICE with requirements-SERVICE.txt
# installed, on Debian's /usr/bin/python3 (a python3 earlier on root's PATH,
# e.g. pyenv's under /root, is out of other users' reach); with USER, also
# that USER (made if missing) can run it. pip only runs when the requirements
# changed since the last install.
ensure_venv() {
  local service="$1" user="${2:-}"
  local requirements="$REPO_DIR/requirements-$service.txt"
  local venv="$VENV_ROOT/$service"
  local stamp
  [[ -f "$requirements" ]] || die "missing $requirements"
  apt_install python3
  apt_install python3-venv
  if [[ -n "$user" ]]; then
    ensure_service_user "$user"
    if [[ -x "$venv/bin/python" ]] && ! runuser -u "$user" -- "$venv/bin/python" -c "" 2>/dev/null; then
      log "venv: $user cannot run $venv/bin/python, making it again"
      rm -f "$venv/.requirements.sha256"
      /usr/bin/python3 -m venv --clear "$venv"
    fi
  fi
  if ! "$venv/bin/python" -c "" 2>/dev/null; then
    log "venv: creating $venv"
    mkdir -p "$VENV_ROOT"
    /usr/bin/python3 -m venv --clear "$venv"
  fi
  # The stamp covers the file and the files it includes with "-r other.txt".
  local files=("$requirements") included
  while read -r included; do
    files+=("$(dirname "$requirements")/$included")
  done < <(sed -n 's/^[[:space:]]*-r[[:space:]]*//p' "$requirements")
  stamp="$(cat "${files[@]}" | sha256sum | cut -d" " -f1)"
  if [[ "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" != "$stamp" ]]; then
    log "venv: installing $(basename "$requirements") into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    printf '%s\n' "$stamp" >"$venv/.requirements.sha256"
  fi
}

# --- PostgreSQL ---

# psql_admin ARGS...: psql as the postgres superuser over the Unix socket.
psql_admin() {
  (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@")
}

# ensure_postgres [ADDRESS]: PostgreSQL installed, running, listening on
# localhost only, or also on ADDRESS (the cluster's private address, for its
# other hosts; each is admitted by ensure_pg_hba, over TLS).
ensure_postgres() {
  local conf_dir listen="localhost${1:+,$1}" now
  apt_install ssl-cert  # the certificate Debian's PostgreSQL serves TLS with
  apt_install postgresql
  start_postgres
  for conf_dir in /etc/postgresql/*/main/conf.d; do
    [[ -d "$conf_dir" ]] || continue
    write_file "$conf_dir/50-movie-shop.conf" \
      "# Managed by scripts/lib.sh: the addresses PostgreSQL listens on." \
      "listen_addresses = '$listen'" || true
  done
  restart_on_failure postgresql@.service
  now="$(psql_admin -At -c "SHOW listen_addresses")"
  if [[ "$now" != "$listen" ]]; then
    if is_systemd; then
      log "postgresql: restarting to listen on '$listen' (was '$now')"
      systemctl restart postgresql
      start_postgres
    else
      log "warning: postgresql listens on '$now'; restart it to apply '$listen'"
    fi
  fi
}

# restart_on_failure UNIT: systemd brings UNIT back RESTART_SEC after it dies
# (a crash, a SIGKILL); a clean stop stays a stop. Debian's postgresql@ has no
# restart at all, and rabbitmq-server's waits 10 s.
RESTART_SEC=2
restart_on_failure() {
  is_systemd || return 0
  if write_file "/etc/systemd/system/$1.d/movie-shop.conf" \
    "# Managed by scripts/lib.sh: back ${RESTART_SEC} s after a crash." \
    "[Service]" "Restart=on-failure" "RestartSec=$RESTART_SEC"; then
    systemctl daemon-reload
  fi
}

# start_postgres: start every stopped cluster and wait until it answers.
start_postgres() {
  local version name _rest tries
  if is_systemd; then
    systemctl enable --quiet --now postgresql
  fi
  while read -r version name _rest; do
    if ! pg_ctlcluster "$version" "$name" status >/dev/null 2>&1; then
      log "postgresql: starting cluster $version/$name"
      if is_systemd; then
        systemctl start "postgresql@$version-$name"
      else
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
      fi
    fi
  done < <(pg_lsclusters --no-header)
  for ((tries = 0; tries < 30; tries++)); do
    pg_isready -q && return 0
    sleep 1
  done
  die "postgresql did not become ready"
}

# ensure_database ROLE PASSWORD DATABASE SCHEMA_FILE [PORT]: a login role with a
# scram password, its own database, the schema applied (tables owned by ROLE),
# and a pg_hba.conf line letting ROLE log in from 127.0.0.1 with that password.
ensure_database() {
  local role="$1" password="$2" db="$3" schema="$4" port="${5:-5432}"
  require_identifier "$role"
  require_identifier "$db"
  [[ -f "$schema" ]] || die "missing $schema"
  log "postgresql: role $role, database $db"
  # The password travels through the environment, not the command line.
  MOVIE_SHOP_DB_PASSWORD="$password" psql_admin -d postgres <<SQL
SET client_min_messages = warning;
\getenv db_password MOVIE_SHOP_DB_PASSWORD
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE $role LOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') \gexec
ALTER ROLE $role WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'db_password';
SELECT 'CREATE DATABASE $db OWNER $role'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db') \gexec
ALTER DATABASE $db OWNER TO $role;
SQL
  log "postgresql: applying $(basename "$schema") to $db as $role"
  {
    printf 'SET client_min_messages = warning;\n'
    # Tables created by an earlier run as another user change hands first.
    printf "SELECT format('ALTER TABLE public.%%I OWNER TO %s', tablename)\n" "$role"
    printf "  FROM pg_tables WHERE schemaname = 'public' AND tableowner <> '%s' \\gexec\n" "$role"
    printf 'SET ROLE %s;\n' "$role"
    cat "$schema"
    printf '\nRESET ROLE;\n'
  } | psql_admin -d "$db"
  ensure_pg_hba "$role" "$db"
  if ! PGPASSWORD="$password" psql -X -q -h 127.0.0.1 -p "$port" -U "$role" -d "$db" \
    -c "SELECT 1" >/dev/null; then
    die "$role cannot log in to $db on 127.0.0.1 with the password from .env"
  fi
}

# ensure_pg_hba ROLE DATABASE [ADDRESS]: password (scram) login for ROLE from
# 127.0.0.1, or over TLS from ADDRESS (another host of the cluster), placed
# before the first rule so that no broader rule shadows it.
ensure_pg_hba() {
  local role="$1" db="$2" hba line
  hba="$(psql_admin -At -c "SHOW hba_file")"
  line="host    $db    $role    127.0.0.1/32    scram-sha-256"
  if [[ -n "${3:-}" ]]; then
    line="hostssl    $db    $role    $3/32    scram-sha-256"
  fi
  if grep -qxF "$line" "$hba"; then
    return 0
  fi
  log "postgresql: adding '$line' to $hba"
  awk -v rule="$line" '
    !done && $0 !~ /^[[:space:]]*(#|$)/ {
      print "# movie-shop: the service logs in with the password from .env"
      print rule
      done = 1
    }
    { print }
    END { if (!done) print rule }
  ' "$hba" >"$hba.movie-shop.tmp"
  # cat keeps the file's owner and mode.
  cat "$hba.movie-shop.tmp" >"$hba"
  rm -f "$hba.movie-shop.tmp"
  psql_admin -At -c "SELECT pg_reload_conf()" >/dev/null
}

# --- RabbitMQ ---

# The cluster's RabbitMQ nodes, as the Vagrantfile names their hosts (the
# host name is the node's: rabbit@billing-vm), with the settings of their addresses.
CLUSTER_NODES=(billing-vm:BILLING_HOST billing-vm-2:BILLING_2_HOST billing-vm-3:BILLING_3_HOST)

# ensure_rabbitmq: RabbitMQ installed and running; when RABBITMQ_HOST is not a
# loopback address (the VMs) it also takes AMQP on that address, and keeps the
# Erlang distribution port and epmd (what rabbitmqctl uses) on loopback. In
# the cluster, distribution and epmd are on the private address instead (the
# firewall admits the other nodes only), the Erlang cookie comes from .env,
# and a node that is not in the cluster joins it (ensure_rabbitmq_cluster).
ensure_rabbitmq() {
  local listeners node_ip changed=0 cluster_conf=()
  apt_install rabbitmq-server
  # shellcheck disable=SC2153  # billing.sh requires it
  if ! is_loopback "$RABBITMQ_HOST"; then
    if is_cluster; then
      ensure_cluster_names
      ensure_erlang_cookie && changed=1
      cluster_conf=(
        "# The cluster: its nodes, found by classic peer discovery after a reset."
        "cluster_formation.peer_discovery_backend = classic_config"
      )
      local i=1 node
      for node in "${CLUSTER_NODES[@]}"; do
        cluster_conf+=("cluster_formation.classic_config.nodes.$i = rabbit@${node%%:*}")
        i=$((i + 1))
      done
      cluster_conf+=(
        "# A node cut off from the majority stops rather than split the cluster."
        "cluster_partition_handling = pause_minority"
        "# The quorum queue's write-ahead log: 64 MB before a flush, not 512 (1 GiB VMs)."
        "raft.wal_max_size_bytes = 64000000"
      )
    fi
    # rabbitmqctl reaches the node at its host name: Debian maps it to 127.0.1.1;
    # in the cluster ensure_cluster_names maps it to the private address.
    node_ip="$(getent ahostsv4 "$(hostname -s)" | awk 'NR == 1 { print $1 }')"
    if is_cluster; then
      [[ "$node_ip" == "$RABBITMQ_HOST" ]] || die "$(hostname -s) resolves to '$node_ip', not $RABBITMQ_HOST (/etc/hosts)"
    else
      is_loopback "$node_ip" || die "$(hostname -s) resolves to '$node_ip', not a loopback address (/etc/hosts)"
    fi
    if write_file /etc/rabbitmq/rabbitmq.conf \
      "# Managed by scripts/billing.sh: AMQP on this VM's address (for gateway-vm)" \
      "# and on loopback; the Erlang distribution port on $node_ip only." \
      "listeners.tcp.1 = 127.0.0.1:$RABBITMQ_PORT" \
      "listeners.tcp.2 = $RABBITMQ_HOST:$RABBITMQ_PORT" \
      "distribution.listener.interface = $node_ip" \
      "loopback_users.guest = true" \
      "${cluster_conf[@]}"; then
      changed=1
    fi
    if write_file /etc/systemd/system/epmd.socket.d/movie-shop.conf \
      "# Managed by scripts/billing.sh: epmd on loopback (and the cluster's address)." \
      "[Socket]" "ListenStream=" "ListenStream=127.0.0.1:4369" \
      "$([[ "$node_ip" == 127.0.0.1 ]] || echo "ListenStream=$node_ip:4369")"; then
      changed=1
    fi
    if ((changed)) && is_systemd; then
      log "rabbitmq: restarting with epmd and AMQP on their addresses"
      systemctl daemon-reload
      systemctl stop rabbitmq-server epmd.socket epmd.service
      systemctl start epmd.socket
    elif ((changed)) && rabbitmq_running; then
      log "warning: restart RabbitMQ to apply /etc/rabbitmq/rabbitmq.conf"
    fi
  fi
  restart_on_failure rabbitmq-server.service
  start_rabbitmq
  if ! is_loopback "$RABBITMQ_HOST"; then
    listeners="$(rabbitmq-diagnostics -q listeners)"
    if ! grep "protocol: amqp" <<<"$listeners" | grep -qF "$RABBITMQ_HOST"; then
      die "rabbitmq does not listen on $RABBITMQ_HOST; check /etc/rabbitmq/rabbitmq-env.conf"
    fi
    if is_cluster; then
      ensure_rabbitmq_cluster
    fi
    if rabbitmqctl -q list_users | cut -f1 | grep -qx guest; then
      log "rabbitmq: deleting the guest user"
      rabbitmqctl -q delete_user guest >/dev/null
    fi
  fi
}

# ensure_cluster_names: each node's host name on its private address in
# /etc/hosts (Erlang finds its peers, and rabbitmqctl its node, by name), and
# this host's own name no longer on 127.0.1.1.
ensure_cluster_names() {
  local node key lines=() name
  name="$(hostname -s)"
  for node in "${CLUSTER_NODES[@]}"; do
    key="${node#*:}"
    lines+=("${!key}	${node%%:*}")
  done
  {
    printf '# movie-shop: the RabbitMQ nodes\n'
    printf '%s\n' "${lines[@]}"
    printf '# movie-shop: end\n'
    sed -e '/^# movie-shop: the RabbitMQ nodes$/,/^# movie-shop: end$/d' \
      -e "/^127\.0\.1\.1[[:space:]]/s/[[:space:]]$name\([[:space:]]\|\$\)/ /g" \
      -e '/^127\.0\.1\.1[[:space:]]*$/d' /etc/hosts
  } >/etc/hosts.movie-shop
  if ! cmp -s /etc/hosts.movie-shop /etc/hosts; then
    cat /etc/hosts.movie-shop >/etc/hosts
  fi
  rm -f /etc/hosts.movie-shop
}

# ensure_erlang_cookie: RABBITMQ_CLUSTER_COOKIE as the node's (and rabbitmqctl's)
# cookie; true if it changed (the node must then be restarted).
ensure_erlang_cookie() {
  local file=/var/lib/rabbitmq/.erlang.cookie
  [[ "$(cat "$file" 2>/dev/null)" != "$RABBITMQ_CLUSTER_COOKIE" ]] || return 1
  log "rabbitmq: the Erlang cookie from .env"
  if is_systemd; then
    systemctl stop rabbitmq-server
  fi
  install -m 0400 -o rabbitmq -g rabbitmq /dev/null "$file"
  printf '%s' "$RABBITMQ_CLUSTER_COOKIE" >"$file"
}

# ensure_rabbitmq_cluster: a node other than the first joins the first one's
# cluster (once that node answers, up to 10 minutes), unless it is in already.
ensure_rabbitmq_cluster() {
  local first="rabbit@${CLUSTER_NODES[0]%%:*}" tries
  [[ "rabbit@$(hostname -s)" != "$first" ]] || return 0
  if rabbitmqctl -q cluster_status --formatter json | grep -qF "\"$first\""; then
    return 0
  fi
  log "rabbitmq: waiting for $first to answer"
  for ((tries = 0; tries < 300; tries++)); do
    rabbitmqctl -q -n "$first" await_startup --timeout 2 >/dev/null 2>&1 && break
    sleep 2
  done
  log "rabbitmq: joining the cluster of $first"
  # Joining logs warnings of the node's reset on stderr: shown only on failure.
  local out
  out="$({ rabbitmqctl -q stop_app && rabbitmqctl -q reset &&
    rabbitmqctl -q join_cluster "$first" && rabbitmqctl -q start_app &&
    rabbitmqctl -q await_startup --timeout 120; } 2>&1)" || die "rabbitmq: joining $first failed: $out"
}

# cluster_complete: every node of the cluster is running (then, and only then,
# the quorum queue is declared: on all three).
cluster_complete() {
  local running node
  running="$(rabbitmqctl -q cluster_status --formatter json)"
  for node in "${CLUSTER_NODES[@]}"; do
    python3 -c 'import json, sys; sys.exit(sys.argv[1] not in json.load(sys.stdin)["running_nodes"])' \
      "rabbit@${node%%:*}" <<<"$running" || return 1
  done
}

rabbitmq_running() {
  rabbitmq-diagnostics -q ping >/dev/null 2>&1
}

# start_rabbitmq: start the broker if it is stopped and wait for it.
start_rabbitmq() {
  if is_systemd; then
    systemctl enable --quiet --now rabbitmq-server
  elif ! rabbitmq_running; then
    log "rabbitmq: starting"
    rabbitmq-server -detached
    sleep 2
  fi
  rabbitmqctl -q await_startup --timeout 120 >/dev/null
}

# ensure_rabbitmq_user USER PASSWORD CONFIGURE WRITE READ: USER with PASSWORD
# and these rights (regular expressions of resource names) on vhost /.
ensure_rabbitmq_user() {
  local user="$1" password="$2" users
  users="$(rabbitmqctl -q list_users | cut -f1)"
  # rabbitmqctl reads the password from stdin when it is not an argument.
  if grep -qxF "$user" <<<"$users"; then
    printf '%s\n' "$password" | rabbitmqctl -q change_password "$user" >/dev/null
  else
    log "rabbitmq: adding user $user"
    printf '%s\n' "$password" | rabbitmqctl -q add_user "$user" >/dev/null
  fi
  rabbitmqctl -q set_permissions -p / "$user" "$3" "$4" "$5"
}

# regex_quote TEXT: TEXT as a regular expression matching only itself.
regex_quote() {
  # shellcheck disable=SC2001,SC2016  # a sed bracket expression, not a parameter
  sed 's/[].[\\*^$()+?{}|]/\\&/g' <<<"$1"
}

# ensure_billing_rabbitmq: the two service users (ensure_cluster_queues: the queues). The gateway
# may publish through the default exchange (which routes by queue name) and
# nothing else; billing may consume billing_queue and nothing else (RabbitMQ
# dead-letters what billing rejects without any right of billing's). Neither
# may declare, purge or delete a queue, so the queues are declared here.
ensure_billing_rabbitmq() {
  local queue
  queue="$(regex_quote "$RABBITMQ_QUEUE")"
  ensure_rabbitmq_user "$RABBITMQ_GATEWAY_USER" "$RABBITMQ_GATEWAY_PASSWORD" \
    '^$' '^amq\.default$' '^$'
  ensure_rabbitmq_user "$RABBITMQ_BILLING_USER" "$RABBITMQ_BILLING_PASSWORD" \
    '^$' '^$' "^$queue\$"
}

# ensure_cluster_queues: the queues, declared (or migrated) on the three VMs
# here, and in the cluster only by its last node, once every node runs (one
# node at a time may migrate: two would delete each other's new queue).
# billing_app must run already: a migration waits for it to drain the queue.
ensure_cluster_queues() {
  local last="${CLUSTER_NODES[-1]%%:*}" tries
  if ! is_cluster; then
    ensure_billing_queues
    return
  fi
  if [[ "$(hostname -s)" != "$last" ]]; then
    log "rabbitmq: $last declares $RABBITMQ_QUEUE once every node has joined"
    return 0
  fi
  for ((tries = 0; tries < 300; tries++)); do
    cluster_complete && break
    sleep 2
  done
  cluster_complete || die "rabbitmq: not every node of ${CLUSTER_NODES[*]%%:*} runs"
  ensure_billing_queues
}

# ensure_billing_queues: the queues of RABBITMQ_QUEUE_TYPE, migrated from
# another type if need be.
ensure_billing_queues() {
  migrate_billing_queue
  declare_billing_queues
  resume_publishing
}

# migrate_billing_queue: a queue's type is chosen when it is declared, so a
# billing_queue of another type than RABBITMQ_QUEUE_TYPE (classic by default)
# is drained, then deleted, for declare_billing_queues to declare it anew.
# Meanwhile a memory alarm blocks every publisher of the cluster (the gateway
# answers 503 at once; a client retries with its Idempotency-Key) and billing,
# which must be running, empties it. A policy refusing messages would not do:
# a message published as the queue goes is confirmed, and lost with it.
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-600}"
PAUSED_WATERMARK=""
migrate_billing_queue() {
  local want="${RABBITMQ_QUEUE_TYPE:-classic}" have left consumers waited=0
  have="$(queue_field type)"
  [[ -n "$have" && "$have" != "$want" ]] || return 0
  log "rabbitmq: $RABBITMQ_QUEUE is a $have queue, $want wanted: blocking publishers while billing drains it"
  pause_publishing
  sleep 1  # what was already read from publishers reaches the queue
  while left="$(queue_field messages)" && [[ "$left" != 0 ]]; do
    consumers="$(queue_field consumers)"
    if ((waited >= DRAIN_TIMEOUT)) || { [[ "$consumers" == 0 ]] && ((waited >= 60)); }; then
      resume_publishing
      die "rabbitmq: $RABBITMQ_QUEUE still holds $left messages ($consumers consumers) after $waited s; start billing_app and provision again"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  rabbitmqctl -q delete_queue --if-empty "$RABBITMQ_QUEUE" >/dev/null
  log "rabbitmq: $RABBITMQ_QUEUE drained in $waited s and deleted; declaring it as a $want queue"
}

# queue_field type|messages|consumers: that of billing_queue, or nothing if
# there is none. Asked of that queue alone: list_queues waits for every
# queue of the cluster, and fails if one does not answer in time.
queue_field() {
  local column
  column="$(printf 'type\nmessages\nconsumers\n' | grep -nx "$1" | cut -d: -f1)"
  rabbitmqctl -q eval "case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue,
      <<\"$RABBITMQ_QUEUE\">>)) of
    {ok, Q} -> [{type, T}, {messages, M}, {consumers, C}] =
                 rabbit_amqqueue:info(Q, [type, messages, consumers]),
               io:format(\"queue ~s ~b ~b~n\", [T, M, C]);
    _ -> ok
  end." | awk -v c="$column" '$1 == "queue" { print $(c + 1) }'
}

# pause_publishing, resume_publishing: a memory alarm (watermark 0) blocks
# every connection that publishes, on every node; consumers go on.
pause_publishing() {
  PAUSED_WATERMARK="$(rabbitmqctl -q eval 'vm_memory_monitor:get_vm_memory_high_watermark().')"
  trap resume_publishing EXIT  # also if provisioning stops on an error
  rabbitmqctl -q set_vm_memory_high_watermark 0 >/dev/null
}

resume_publishing() {
  local value="$PAUSED_WATERMARK"
  [[ -n "$value" ]] || return 0
  if [[ "$value" =~ ^\{absolute,([0-9]+)\}$ ]]; then
    rabbitmqctl -q set_vm_memory_high_watermark absolute "${BASH_REMATCH[1]}" >/dev/null
  else
    rabbitmqctl -q set_vm_memory_high_watermark "$value" >/dev/null
  fi
  PAUSED_WATERMARK=""
  log "rabbitmq: publishers unblocked"
}

# declare_billing_queues: the durable queue, dead-lettering to its dead-letter
# queue, and that queue, declared as the services would declare them (the
# arguments come from billing.py), by a user that exists only meanwhile, with
# just the rights a declaration needs.
declare_billing_queues() {
  local user password queue
  user="movie-shop-provision-$(hostname -s)"
  queue="$(regex_quote "$RABBITMQ_QUEUE")"
  password="$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
  ensure_rabbitmq_user "$user" "$password" "^$queue(\\.dead)?\$" '^amq\.default$' "^$queue\$"
  local status=0
  MOVIE_SHOP_MQ_USER="$user" MOVIE_SHOP_MQ_PASSWORD="$password" \
    "$VENV_ROOT/billing/bin/python" - <<'PY' || status=$?
"""Declare billing_queue (dead-lettering to billing_queue.dead) and billing_queue.dead."""
import os
import sys

import pika

sys.dont_write_bytecode = True  # root writes no __pycache__ into the repository
sys.path.insert(0, os.environ["REPO_DIR"])
from billing import queue_arguments  # the one source, not a copy

queue = os.environ["RABBITMQ_QUEUE"]
dead = f"{queue}.dead"
params = pika.ConnectionParameters(
    host="127.0.0.1",
    port=int(os.environ["RABBITMQ_PORT"]),
    credentials=pika.PlainCredentials(
        os.environ["MOVIE_SHOP_MQ_USER"], os.environ["MOVIE_SHOP_MQ_PASSWORD"]
    ),
    connection_attempts=10,
    retry_delay=2,
)
try:
    with pika.BlockingConnection(params) as connection:
        channel = connection.channel()
        channel.queue_declare(dead, durable=True)
        channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
except pika.exceptions.ChannelClosedByBroker as exc:
    sys.exit(f"rabbitmq: {queue} exists with other settings ({exc}); "
             f"delete it with: sudo rabbitmqctl delete_queue {queue}")
print(f"==> rabbitmq: queues {queue} and {dead} declared")
PY
  rabbitmqctl -q delete_user "$user" >/dev/null
  return "$status"
}

# --- PM2 ---

# pm2_start_app NAME: start NAME from ecosystem.config.js, or reload it with
# the current code and environment if PM2 already knows it.
declare -A app_script=([inventory_app]=inventory.py [billing_app]=billing.py [api_gateway]=gateway.py)
declare -A app_venv=([inventory_app]=inventory [billing_app]=billing [api_gateway]=gateway)

# pm2_app_field APP FIELD: a field of APP's pm2_env in root's PM2, or nothing.
pm2_app_field() {
  pm2 jlist 2>/dev/null | node -e '
    let text = "";
    process.stdin.on("data", (d) => (text += d)).on("end", () => {
      try {
        const app = JSON.parse(text).find((p) => p.name === process.argv[1]);
        console.log(app ? app.pm2_env[process.argv[2]] || "" : "");
      } catch (e) {
        console.log("");
      }
    });' "$1" "$2"
}

pm2_start_app() {
  local app="$1" args=() user
  user="$(service_user "${app_venv[$app]}")"
  ensure_service_user "$user"
  protect_files "$app"
  if [[ -n "${PM2_ENV:-}" ]]; then
    args+=(--env "$PM2_ENV")
  fi
  # A reload keeps the app's old paths and user: an app started from another
  # checkout (or with another venv, or as another user) is replaced instead.
  # PM2 may hold the user by name or by number (uid).
  if [[ "$(pm2_app_field "$app" pm_exec_path)" != "" &&
    ("$(pm2_app_field "$app" pm_exec_path)" != "$REPO_DIR/${app_script[$app]}" ||
    "$(pm2_app_field "$app" exec_interpreter)" != "$VENV_ROOT/${app_venv[$app]}/bin/python" ||
    "$(pm2_app_field "$app" uid)" != @("$user"|"$(id -u "$user")")) ]]; then
    log "pm2: $app runs from elsewhere or as another user, replacing it"
    pm2 delete "$app" >/dev/null
  fi
  # A reload keeps the environment the app was first started with, whatever
  # --update-env says: one started in another topology is replaced too.
  if [[ "$(pm2_app_field "$app" pm_exec_path)" != "" &&
    "$(pm2_app_field "$app" CLUSTER)" != "${CLUSTER:-0}" ]]; then
    log "pm2: $app was started with CLUSTER=$(pm2_app_field "$app" CLUSTER), replacing it"
    pm2 delete "$app" >/dev/null
  fi
  log "pm2: start or reload $app"
  pm2 startOrReload "$REPO_DIR/ecosystem.config.js" --only "$app" --update-env "${args[@]}" >/dev/null
}

# pm2_persist APP...: save the process list; with systemd, also resurrect it at
# boot and start APP then even if it was stopped: PM2 saves its list, stopped
# apps included, when the machine shuts down, and would bring APP back stopped.
pm2_persist() {
  local app starts=()
  pm2 save --force >/dev/null
  if ! is_systemd; then
    log "pm2: systemd is not PID 1 here, skipping 'pm2 startup'"
    return 0
  fi
  if ! systemctl is-enabled --quiet pm2-root 2>/dev/null; then
    log "pm2: enabling the pm2-root service (start at boot)"
    pm2 startup systemd -u root --hp "$(dirname "$PM2_HOME")" >/dev/null
  fi
  for app in "$@"; do
    # "pm2 pid" prints 0 for a stopped app; "pm2 start" would restart a running
    # one. The "-" keeps the unit up if the app was deleted from PM2.
    starts+=("ExecStartPost=-/bin/sh -c '[ \"\$\$(pm2 pid $app)\" -gt 0 ] || pm2 start $app'")
  done
  if write_file /etc/systemd/system/pm2-root.service.d/movie-shop.conf \
    "# Managed by scripts/lib.sh: this VM's app runs after every boot." \
    "[Service]" "${starts[@]}"; then
    systemctl daemon-reload
  fi
}

# --- Service users and their files ---

# Every service runs as its own system user, movie-<service>, whose primary
# group SERVICE_GROUP may read .env and the logs (ecosystem.config.js names
# both; PM2 drops supplementary groups, so only the primary group counts).
SERVICE_GROUP=movie-shop

service_user() {
  printf 'movie-%s\n' "$1"
}

# ensure_service_user USER: a system user with no login shell, no home and no
# sudo, in the group SERVICE_GROUP.
ensure_service_user() {
  local user="$1"
  if ! getent group "$SERVICE_GROUP" >/dev/null; then
    groupadd --system "$SERVICE_GROUP"
  fi
  if ! getent passwd "$user" >/dev/null; then
    log "users: adding system user $user (group $SERVICE_GROUP, no login)"
    useradd --system --gid "$SERVICE_GROUP" --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin "$user"
  fi
}

# open_path_to_services DIR: let the group SERVICE_GROUP pass through every
# directory down to DIR (a clone in a home directory, 0700 on Debian 12): an
# ACL entry giving it search (x) only, added where it could not pass;
# down.sh --purge takes these entries back. Stops if DIR's files stay unreadable.
open_path_to_services() {
  local dir="$1" path="" part parts=() user
  # Checked as a service user itself: the clone's owner passes its home anyway.
  user="$(service_user gateway)"
  ensure_service_user "$user"
  IFS=/ read -ra parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    path+="/$part"
    if ! runuser -u "$user" -- test -x "$path"; then
      apt_install acl
      log "users: group $SERVICE_GROUP may now pass through $path (ACL g:$SERVICE_GROUP:x)"
      setfacl -m "g:$SERVICE_GROUP:x" "$path"
    fi
  done
  runuser -u "$user" -- test -r "$dir/gateway.py" ||
    die "the service users cannot read $dir/gateway.py: make the clone readable (chmod -R o+rX $dir, or clone it again with umask 022)"
}

# close_path_to_services DIR: take back the ACL entries open_path_to_services added.
close_path_to_services() {
  local dir="$1" path="" part parts=()
  command -v getfacl >/dev/null || return 0
  IFS=/ read -ra parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    path+="/$part"
    if getfacl -cp "$path" 2>/dev/null | grep -q "^group:$SERVICE_GROUP:"; then
      log "users: removing the ACL entry of $SERVICE_GROUP on $path"
      setfacl -x "g:$SERVICE_GROUP" "$path"
      # Only the mask left: drop it too, so the directory is as it was.
      if ! getfacl -cp "$path" | grep -qE "^(user|group):[^:]+:"; then
        setfacl -b "$path"
      fi
    fi
  done
}

# protect_files APP: .env and APP's PM2 logs owned by root, readable by the
# group SERVICE_GROUP (0640), never by other users; PM2 (root) writes the logs,
# the service writes nothing. Where systemd runs, logrotate keeps them bounded.
protect_files() {
  local app="$1" file
  chown root:"$SERVICE_GROUP" "$REPO_DIR/.env"
  chmod 0640 "$REPO_DIR/.env"
  install -d -m 0750 -o root -g "$SERVICE_GROUP" "$LOG_DIR"
  for file in "$LOG_DIR/$app.out.log" "$LOG_DIR/$app.err.log"; do
    [[ -e "$file" ]] || : >"$file"
    chown root:"$SERVICE_GROUP" "$file"
    chmod 0640 "$file"
  done
  if is_systemd; then
    ensure_logrotate
  fi
}

# ensure_logrotate: the logs rotate when a day has passed or when one passes
# 20 MiB (checked hourly), 7 kept; copytruncate keeps PM2's open file, its
# owner and mode.
ensure_logrotate() {
  apt_install logrotate
  write_file /etc/logrotate.d/movie-shop \
    "# Managed by scripts/lib.sh: the PM2 logs of the movie shop's apps." \
    "$LOG_DIR/*.log {" \
    "    daily" \
    "    maxsize 20M" \
    "    rotate 7" \
    "    compress" \
    "    delaycompress" \
    "    missingok" \
    "    notifempty" \
    "    copytruncate" \
    "}" || true
  if write_file /etc/systemd/system/logrotate.timer.d/movie-shop.conf \
    "# Managed by scripts/lib.sh: check sizes hourly (daily rules still rotate daily)." \
    "[Timer]" "OnCalendar=" "OnCalendar=hourly" "AccuracySec=1m"; then
    systemctl daemon-reload
  fi
  systemctl enable --quiet --now logrotate.timer
}

# --- Firewall ---

FIREWALL_TABLE=movie_shop
FIREWALL_FILE=/etc/movie-shop/firewall.nft
FIREWALL_UNIT=movie-shop-firewall.service

# ensure_firewall ADDRESS RULE...: on a VM (ADDRESS, where its service listens,
# not loopback, and systemd runs), admit only loopback, SSH, ICMP, answers to
# the VM's own connections and each RULE: PORT (from anywhere) or PORT:SOURCE
# (from that IPv4 address only); a TCP connection to anything else is reset.
# The rules load now and at every boot, before the network comes up.
ensure_firewall() {
  local address="$1" rule port source allow=() changed=0
  shift
  if is_loopback "$address" || ! is_systemd; then
    return 0
  fi
  for rule in "$@"; do
    port="${rule%%:*}"
    source="${rule#"$port"}"
    source="${source#:}"
    [[ "$port" =~ ^[0-9]{1,5}$ ]] || die "firewall: '$port' is not a port"
    if [[ -z "$source" ]]; then
      allow+=("    tcp dport $port accept")
    elif [[ "$source" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
      allow+=("    ip saddr $source tcp dport $port accept")
    else
      die "firewall: '$source' is not an IPv4 address"
    fi
  done
  apt_install nftables
  # The first two lines make loading the file again replace the table whole.
  if write_file "$FIREWALL_FILE" \
    "# Managed by scripts/lib.sh: what this VM admits, by its role." \
    "table inet $FIREWALL_TABLE" \
    "delete table inet $FIREWALL_TABLE" \
    "table inet $FIREWALL_TABLE {" \
    "  chain input {" \
    "    type filter hook input priority filter; policy drop;" \
    "    iif lo accept" \
    "    ct state established,related accept" \
    "    ct state invalid drop" \
    "    meta l4proto { icmp, ipv6-icmp } accept" \
    "    tcp dport 22 accept  # SSH: vagrant ssh" \
    "${allow[@]}" \
    "    meta l4proto tcp reject with tcp reset" \
    "    reject" \
    "  }" \
    "}"; then
    changed=1
  fi
  if write_file "/etc/systemd/system/$FIREWALL_UNIT" \
    "# Managed by scripts/lib.sh: loads $FIREWALL_FILE at boot." \
    "[Unit]" \
    "Description=Movie shop firewall" \
    "DefaultDependencies=no" \
    "Wants=network-pre.target" \
    "Before=network-pre.target shutdown.target" \
    "Conflicts=shutdown.target" \
    "[Service]" \
    "Type=oneshot" \
    "RemainAfterExit=yes" \
    "ExecStart=/usr/sbin/nft -f $FIREWALL_FILE" \
    "ExecStop=/usr/sbin/nft delete table inet $FIREWALL_TABLE" \
    "[Install]" \
    "WantedBy=sysinit.target"; then
    changed=1
    systemctl daemon-reload
  fi
  systemctl enable --quiet "$FIREWALL_UNIT"
  if ((changed)) || ! nft list table inet "$FIREWALL_TABLE" >/dev/null 2>&1; then
    log "firewall: admitting SSH and ${*:-nothing else}"
    systemctl restart "$FIREWALL_UNIT"
  fi
}

# --- Files ---

# write_file PATH LINE...: write the lines to PATH; true only if PATH changed.
write_file() {
  local path="$1" content
  shift
  content="$(printf '%s\n' "$@")"
  if [[ -f "$path" && "$(cat "$path")" == "$content" ]]; then
    return 1
  fi
  if [[ -f "$path" && ! -f "$path.orig" ]] && ! grep -q "movie-shop" "$path"; then
    cp -p "$path" "$path.orig"
  fi
  mkdir -p "$(dirname "$path")"
  printf '%s\n' "$content" >"$path"
}
