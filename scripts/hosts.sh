#!/usr/bin/env bash
# The three VMs of the Vagrantfile as three Debian 12 hosts on this Linux machine,
# without a hypervisor: the local stand-in for `vagrant up`. Run as root.
#
#   scripts/hosts.sh up                  build (or reuse) the base, make the network,
#                                        boot, copy the repository, provision
#   scripts/hosts.sh down                remove everything `up` made (safe after a failed up)
#   scripts/hosts.sh status              each host: running or not, its address, its PM2 apps
#   scripts/hosts.sh provision [NAME...] copy the repository again and provision (vagrant provision)
#   scripts/hosts.sh reboot NAME         `systemctl reboot` inside NAME, wait until it is back
#   scripts/hosts.sh shell NAME          a root login shell inside NAME (vagrant ssh + sudo -i)
#   scripts/hosts.sh exec NAME -- CMD... run CMD as root inside NAME
#   scripts/hosts.sh check               exit 3 with the reason if hosts cannot be made here
#   scripts/hosts.sh env                 the environment each provisioner gets (KEY=VALUE)
#
# Each host is `systemd-nspawn --boot` (systemd as PID 1, hostname = VM name) on an
# overlay of a cached debootstrap of Debian 12, in a network namespace of its own
# joined to a bridge, with CAP_NET_ADMIN there (for its firewall, as on a VM). The
# names, addresses and provisioning scripts come from the Vagrantfile's MACHINES
# and .env; the provisioning environment is .env plus vm.env, the two files the
# Vagrantfile reads. The bridge has the .1 address of
# the VMs' /24 and stands in for the reviewer's computer. The hosts reach each
# other, and the package registries this machine uses (nftables NAT to their
# addresses, ports 80 and 443) and nothing else.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO_DIR/scripts/hosts.sh"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$REPO_DIR/scripts/lib.sh"

SUITE=bookworm
# What a Vagrant box of Debian 12 has before provisioning; a change of this list
# (or of the mirror) builds a new base.
BASE_PACKAGES=(
  ca-certificates
  dbus
  iproute2
  netbase
  procps
  python3
  sudo
  systemd
  systemd-sysv
)
CACHE_DIR=/var/cache/movie-shop/hosts
STATE_DIR=/var/lib/movie-shop/hosts
CGROUP_NAME=movie-shop-hosts
BRIDGE=movieshop0
NFT_TABLE=movie_shop_hosts
LOCK_FILE=/run/lock/movie-shop-hosts.lock
BOOT_TIMEOUT=90
# An nspawn container exits with 133 when it asks for a reboot.
EXIT_REBOOT=133
CANNOT=3

# --- The machines, from the Vagrantfile and .env ---

declare -a NAMES=() ALL_NAMES=()
declare -A HOST_IP=() HOST_SCRIPT=()
declare -A VM_ENV=()
declare -a VM_ENV_KEYS=()

# read_env_file FILE: the settings of FILE in VM_ENV (in VM_ENV_KEYS' order),
# read by lib.sh's env_line: the grammar of the services, load_env and the
# Vagrantfile alike; a line outside it stops with its number.
read_env_file() {
  local line number=0
  while IFS= read -r line || [[ -n "$line" ]]; do
    number=$((number + 1))
    env_line "${line%$'\r'}" || die "$1 line $number: $ENV_ERROR"
    [[ -n "$ENV_NAME" ]] || continue
    [[ -n "${VM_ENV[$ENV_NAME]+x}" ]] || VM_ENV_KEYS+=("$ENV_NAME")
    VM_ENV["$ENV_NAME"]="$ENV_VALUE"
  done <"$1"
}

# load_machines: NAMES in the Vagrantfile's order, each with its address and
# script; the cluster's hosts only with CLUSTER=1 (the environment wins over
# .env), as in the Vagrantfile. ALL_NAMES has them all (for down).
load_machines() {
  local name ip_key script flag prefix
  [[ -f "$REPO_DIR/.env" ]] || die "$REPO_DIR/.env is missing"
  read_env_file "$REPO_DIR/.env"
  read_env_file "$REPO_DIR/vm.env"
  if [[ -n "${CLUSTER:-}" ]]; then
    VM_ENV[CLUSTER]="$CLUSTER"
    [[ " ${VM_ENV_KEYS[*]} " == *" CLUSTER "* ]] || VM_ENV_KEYS+=(CLUSTER)
  fi
  while read -r name ip_key script flag; do
    ALL_NAMES+=("$name")
    [[ -z "$flag" || "${VM_ENV[CLUSTER]:-0}" == 1 ]] || continue
    [[ -n "${VM_ENV[$ip_key]:-}" ]] || die ".env has no $ip_key for $name"
    NAMES+=("$name")
    HOST_IP["$name"]="${VM_ENV[$ip_key]}"
    HOST_SCRIPT["$name"]="$script"
  done < <(sed -n 's/^[[:space:]]*"\([a-z0-9-]*\)"[[:space:]]*=>[[:space:]]*{[[:space:]]*ip:[[:space:]]*ENV_FILE\["\([A-Z0-9_]*\)"\],[[:space:]]*script:[[:space:]]*"\([a-z0-9_.-]*\)"\(, cluster: true\)\{0,1\}.*/\1 \2 \3 \4/p' \
    "$REPO_DIR/Vagrantfile")
  ((${#NAMES[@]} > 0)) || die "no machines found in $REPO_DIR/Vagrantfile (MACHINES)"
  prefix="${HOST_IP[${NAMES[0]}]%.*}"
  for name in "${NAMES[@]}"; do
    [[ "${HOST_IP[$name]%.*}" == "$prefix" ]] || die "the VMs' addresses are not in one /24"
  done
  BRIDGE_IP="$prefix.1"
  SUBNET="$prefix.0/24"
}

host_dir() {
  printf '%s/%s\n' "$STATE_DIR" "$1"
}

# netns_name NAME, veth_name NAME: this host's network namespace and its link on the bridge.
netns_name() {
  printf 'movie-shop-%s\n' "$1"
}

veth_name() {
  local name="${1/-vm/}"  # inventory-vm-2: ms-inventory-2 (at most 15 characters)
  printf 'ms-%s\n' "${name:0:12}"
}

# --- Checks ---

# check_support: the reason hosts cannot be made here, as exit status 3.
check_support() {
  local reason=""
  if [[ "$(uname -s)" != Linux ]]; then
    reason="not Linux"
  elif [[ "$(id -u)" != 0 ]]; then
    reason="not root (sudo $0 check)"
  elif ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
    reason="the kernel has no overlay file system"
  elif ! unshare --net --mount true 2>/dev/null; then
    reason="cannot make network or mount namespaces"
  elif [[ -z "$(cgroup_roots)" ]]; then
    reason="no writable cgroup hierarchy"
  fi
  if [[ -n "$reason" ]]; then
    printf 'hosts cannot be made here: %s\n' "$reason"
    exit "$CANNOT"
  fi
  printf 'hosts can be made here\n'
}

# --- The base root file system ---

# apt_mirror: the first URI of this machine's apt sources that serves $SUITE.
apt_mirror() {
  local file
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$file" ]] || continue
    awk -v suite="$SUITE" '$1 == "deb" { sub(/\[[^]]*\][[:space:]]*/, ""); if ($3 == suite) print $2 }' "$file"
  done
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$file" ]] || continue
    awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (uris != "" && suites ~ "(^| )" suite "( |$)") print uris; uris = suites = "" }
      /^URIs:/ { uris = $2 }
      /^Suites:/ { $1 = ""; suites = $0 " " }
      END { if (uris != "" && suites ~ "(^| )" suite "( |$)") print uris }
    ' "$file"
  done
}

# ensure_base: the cached debootstrap for this package list and mirror; prints its path.
ensure_base() {
  local mirror key base tmp old
  mirror="$(apt_mirror | head -n 1)"
  [[ -n "$mirror" ]] || die "no apt source for $SUITE on this machine"
  key="$(printf '%s\n' "$SUITE" "$mirror" "${BASE_PACKAGES[@]}" | sha256sum | cut -c1-16)"
  base="$CACHE_DIR/base-$key"
  if [[ ! -f "$base/.complete" ]]; then
    log "base: debootstrap $SUITE from $mirror into $base" >&2
    mkdir -p "$CACHE_DIR"
    tmp="$(mktemp -d "$CACHE_DIR/.build-XXXXXX")"
    if ! debootstrap --variant=minbase --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
      "$SUITE" "$tmp" "$mirror" >"$tmp.log" 2>&1; then
      tail -n 20 "$tmp.log" >&2
      rm -rf "$tmp" "$tmp.log"
      die "debootstrap failed"
    fi
    # Each host gets its own machine id; debootstrap left one in the base.
    : >"$tmp/etc/machine-id"
    rm -f "$tmp/var/lib/dbus/machine-id" "$tmp.log"
    touch "$tmp/.complete"
    rm -rf "$base"
    mv "$tmp" "$base"
    # Older bases (another package list) go, unless a running host still uses one.
    for old in "$CACHE_DIR"/base-*; do
      if [[ "$old" != "$base" ]] && ! grep -qF "lowerdir=$old," /proc/mounts; then
        rm -rf "$old"
      fi
    done
  fi
  printf '%s\n' "$base"
}

# --- Package registries ---

# registry_names: the host names of the apt, pip and npm registries this machine uses.
registry_names() {
  local file
  {
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [[ -f "$file" ]] && awk '$1 ~ /^deb/ { sub(/\[[^]]*\][[:space:]]*/, ""); print $2 }' "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
      [[ -f "$file" ]] && awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$file"
    done
    pip_index_urls
    npm config get registry
  } | sed -n 's#^[a-z+]*://\([^/:@]*\).*#\1#p' | sort -u
}

# pip_index_urls: the network indexes pip uses here: its configured index
# (PyPI and its files host when none is set) and extra indexes. Local
# file:// indexes of this machine do not exist on the hosts.
pip_index_urls() {
  python3 - <<'PY'
"""Print the http(s) index URLs of this machine's pip configuration."""
from pip._internal.configuration import Configuration
from pip._internal.models.index import PyPI

config = Configuration(isolated=False)
config.load()
urls = {"index-url": [], "extra-index-url": []}
for key, value in config.items():
    name = key.split(".")[-1]
    if name in urls:
        urls[name] += [url for url in value.split() if url.startswith("http")]
index = urls["index-url"][-1:] or [PyPI.pypi_url, f"https://{PyPI.file_storage_domain}/"]
print("\n".join(index + urls["extra-index-url"]))
PY
}

# registry_addresses: "ADDRESS NAME" for each registry name, as this machine resolves it.
registry_addresses() {
  local name address
  while read -r name; do
    while read -r address; do
      printf '%s %s\n' "$address" "$name"
    done < <(getent ahostsv4 "$name" | awk '{ print $1 }' | sort -u)
  done < <(registry_names)
}

# --- Network ---

ensure_network() {
  local addresses="$1" elements name ns veth
  if ip -o -4 addr show | grep -v " $BRIDGE " | grep -q " $BRIDGE_IP/"; then
    die "$BRIDGE_IP is already on another interface of this machine (a VirtualBox host-only network?)"
  fi
  mkdir -p "$STATE_DIR"
  [[ -f "$STATE_DIR/ip_forward" ]] || cat /proc/sys/net/ipv4/ip_forward >"$STATE_DIR/ip_forward"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$BRIDGE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for name in "${NAMES[@]}"; do
    ns="$(netns_name "$name")"
    veth="$(veth_name "$name")"
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
    fi
    if ! ip link show "$veth" >/dev/null 2>&1; then
      ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "${HOST_IP[$name]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace default via "$BRIDGE_IP"
  done
  elements="$(awk '{ print $1 }' <<<"$addresses" | sort -u | paste -sd, -)"
  [[ -n "$elements" ]] || die "no package registry address could be resolved"
  nft delete table inet "$NFT_TABLE" 2>/dev/null || true
  # The hosts reach the registries' addresses on 80 and 443 and nothing else
  # beyond the bridge; this machine answers them only on connections it opened.
  nft -f - <<NFT
table inet $NFT_TABLE {
  set registries {
    type ipv4_addr
    elements = { $elements }
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    # Host to host (bridged traffic passes here when br_netfilter is loaded).
    iifname "$BRIDGE" oifname "$BRIDGE" accept
    iifname "$BRIDGE" ip saddr $SUBNET ip daddr @registries tcp dport { 80, 443 } accept
    oifname "$BRIDGE" ct state established,related accept
    iifname "$BRIDGE" drop
    oifname "$BRIDGE" drop
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "$BRIDGE" ct state established,related accept
    iifname "$BRIDGE" drop
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    ip saddr $SUBNET ip daddr @registries oifname != "$BRIDGE" masquerade
  }
}
NFT
  echo 1 >/proc/sys/net/ipv4/ip_forward
}

remove_network() {
  local name ns veth
  for name in "${NAMES[@]}"; do
    ns="$(netns_name "$name")"
    veth="$(veth_name "$name")"
    ip link del "$veth" 2>/dev/null || true
    if ip netns list | grep -qw "$ns"; then
      ip netns del "$ns"
    fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  nft delete table inet "$NFT_TABLE" 2>/dev/null || true
  if [[ -f "$STATE_DIR/ip_forward" ]]; then
    cat "$STATE_DIR/ip_forward" >/proc/sys/net/ipv4/ip_forward
    rm -f "$STATE_DIR/ip_forward"
  fi
}

# --- Cgroups: nspawn runs outside systemd here, in a cgroup of its own ---

# cgroup_roots: the writable hierarchies an nspawn container needs (v2, name=systemd).
cgroup_roots() {
  local dir
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    [[ -w /sys/fs/cgroup ]] && echo /sys/fs/cgroup
    return 0
  fi
  for dir in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
    [[ -d "$dir" && -w "$dir" ]] && echo "$dir"
  done
  return 0
}

# join_cgroup NAME: move this shell into NAME's own cgroup in each hierarchy.
join_cgroup() {
  local root dir
  while read -r root; do
    dir="$root/$CGROUP_NAME/$1"
    mkdir -p "$dir"
    echo "$BASHPID" >"$dir/cgroup.procs"
  done < <(cgroup_roots)
}

# kill_cgroup NAME: SIGKILL every process left in NAME's cgroups, then remove them.
kill_cgroup() {
  local root dir pids tries
  while read -r root; do
    dir="$root/$CGROUP_NAME/$1"
    [[ -d "$dir" ]] || continue
    for ((tries = 0; tries < 20; tries++)); do
      mapfile -t pids < <(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null)
      ((${#pids[@]} > 0)) || break
      kill -KILL "${pids[@]}" 2>/dev/null || true
      sleep 0.2
    done
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
    rmdir "$root/$CGROUP_NAME" 2>/dev/null || true
  done < <(cgroup_roots)
}

# --- Hosts ---

# power NAME: the host's power supply: nspawn, started again when the host reboots.
power() {
  local name="$1" dir rc
  dir="$(host_dir "$name")"
  echo "$$" >"$dir/power.pid"
  join_cgroup "$name"
  while true; do
    rc=0
    systemd-nspawn --boot --quiet \
      --directory="$dir/root" \
      --machine="$name" \
      --hostname="$name" \
      --network-namespace-path="/run/netns/$(netns_name "$name")" \
      --capability=CAP_NET_ADMIN \
      --register=no --keep-unit \
      --resolv-conf=off --timezone=off --link-journal=no \
      --console=read-only &
    echo "$!" >"$dir/nspawn.pid"
    wait "$!" || rc=$?
    rm -f "$dir/nspawn.pid"
    [[ "$rc" == "$EXIT_REBOOT" && ! -f "$dir/stop" ]] || break
    log "$name: rebooting"
  done
  log "$name: powered off (exit $rc)"
}

# host_leader NAME: the PID (in this namespace) of NAME's systemd, or fail.
host_leader() {
  local pid child
  pid="$(cat "$(host_dir "$1")/nspawn.pid" 2>/dev/null)" || return 1
  for child in $(ps -o pid= --ppid "$pid"); do
    if awk '$1 == "NSpid:" && $NF == 1 { found = 1 } END { exit !found }' \
      "/proc/$child/status" 2>/dev/null; then
      echo "$child"
      return 0
    fi
  done
  return 1
}

# host_exec NAME CMD...: run CMD as root in NAME, with a login's clean environment.
host_exec() {
  local name="$1" pid
  shift
  pid="$(host_leader "$name")" || die "$name is not running (scripts/hosts.sh up)"
  nsenter --target "$pid" --all \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM="${TERM:-dumb}" "$@"
}

# wait_booted NAME [OLD_LEADER]: wait until NAME's systemd (not OLD_LEADER) finished booting.
wait_booted() {
  local name="$1" old="${2:-}" pid state="" tries
  for ((tries = 0; tries < BOOT_TIMEOUT * 5; tries++)); do
    if pid="$(host_leader "$name")" && [[ "$pid" != "$old" ]]; then
      state="$(host_exec "$name" timeout 5 systemctl is-system-running --wait 2>/dev/null || true)"
      [[ "$state" == running || "$state" == degraded ]] && return 0
    fi
    sleep 0.2
  done
  tail -n 30 "$(host_dir "$name")/console.log" >&2 || true
  die "$name did not boot within $BOOT_TIMEOUT s (state: ${state:-none})"
}

# copy_registry_settings ROOT: this machine's apt sources and settings, extra CA
# certificates, pip and npm settings into the Debian root file system ROOT, so
# that its package managers reach the registries as this machine does.
copy_registry_settings() {
  local root="$1" file key var value
  # apt: this machine's sources and its own settings (files no package owns).
  rm -f "$root/etc/apt/sources.list"
  mkdir -p "$root/etc/apt/sources.list.d" "$root/etc/apt/apt.conf.d"
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$file" ]] && cp "$file" "$root$file"
  done
  for file in /etc/apt/apt.conf.d/*; do
    [[ -f "$file" ]] && ! dpkg -S "$file" >/dev/null 2>&1 && cp "$file" "$root$file"
  done
  # Extra CA certificates (e.g. an egress proxy's), installed as on this machine.
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
  # pip: its configuration files, and the PIP_* variables as root's pip.conf.
  for file in /etc/pip.conf /etc/xdg/pip; do
    [[ -e "$file" ]] && mkdir -p "$root$(dirname "$file")" && cp -r "$file" "$root$(dirname "$file")/"
  done
  mkdir -p "$root/root/.config/pip"
  {
    printf '[global]\n'
    while IFS='=' read -r var value; do
      key="${var#PIP_}"
      key="${key,,}"
      # A path that does not exist on the host (e.g. a local wheel folder) is left out.
      [[ "$value" == /* && ! -e "$root$value" ]] && continue
      printf '%s = %s\n' "${key//_/-}" "$value"
    done < <(env | grep '^PIP_' | sort)
  } >"$root/root/.config/pip/pip.conf"
  # npm: root's and the global npmrc.
  for file in /root/.npmrc /etc/npmrc; do
    if [[ -f "$file" ]]; then cp "$file" "$root$file"; fi
  done
}

# prepare_host NAME BASE REGISTRIES: the host's overlay on BASE, with its name, the
# registries in /etc/hosts, and this machine's apt, CA, pip and npm settings.
prepare_host() {
  local name="$1" base="$2" registries="$3" dir root
  dir="$(host_dir "$name")"
  root="$dir/root"
  mkdir -p "$dir/upper" "$dir/work" "$root"
  if ! mountpoint -q "$root"; then
    mount -t overlay overlay \
      -o "lowerdir=$base,upperdir=$dir/upper,workdir=$dir/work" "$root"
  fi
  echo "$name" >"$root/etc/hostname"
  [[ -s "$root/etc/machine-id" ]] || systemd-id128 new >"$root/etc/machine-id"
  {
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$name"
    printf '# Package registries, as this machine resolves them (the hosts have no DNS).\n'
    awk '{ printf "%s\t%s\n", $1, $2 }' <<<"$registries" | sort -u -k2,2
  } >"$root/etc/hosts"
  printf '# No DNS: the package registries are in /etc/hosts.\n' >"$root/etc/resolv.conf"
  copy_registry_settings "$root"
  mkdir -p "$root/vagrant"
}

# boot_host NAME: power NAME on and wait until it has booted.
boot_host() {
  local name="$1" dir
  dir="$(host_dir "$name")"
  if host_leader "$name" >/dev/null; then
    return 0
  fi
  rm -f "$dir/stop"
  # The host outlives this command: it must not hold its lock.
  setsid "$SELF" _power "$name" >>"$dir/console.log" 2>&1 </dev/null 9>&- &
  wait_booted "$name"
}

# stop_host NAME: power NAME off (orderly, then by force) and remove its files.
stop_host() {
  local name="$1" dir pid tries root
  dir="$(host_dir "$name")"
  [[ -d "$dir" ]] || return 0
  touch "$dir/stop"
  if pid="$(cat "$dir/nspawn.pid" 2>/dev/null)" && kill -0 "$pid" 2>/dev/null; then
    # nspawn turns SIGTERM into an orderly poweroff of the host.
    kill -TERM "$pid" 2>/dev/null || true
    for ((tries = 0; tries < 100; tries++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
  fi
  if pid="$(cat "$dir/power.pid" 2>/dev/null)"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  kill_cgroup "$name"
  root="$dir/root"
  if mountpoint -q "$root"; then
    umount -R "$root" || umount -R -l "$root"
  fi
  rm -rf "$dir"
  rmdir "/run/systemd/nspawn/propagate/$name" 2>/dev/null || true
}

# sync_repo NAME: the tracked files of the repository into NAME's /vagrant,
# as `vagrant up` copies them with rsync.
sync_repo() {
  local root file
  root="$(host_dir "$1")/root"
  # A tracked file deleted in the working tree is left out.
  git -C "$REPO_DIR" ls-files -z |
    while IFS= read -r -d "" file; do
      if [[ -e "$REPO_DIR/$file" ]]; then printf '%s\0' "$file"; fi
    done |
    tar -C "$REPO_DIR" --null -T - -cf - |
    tar -C "$root/vagrant" -xf -
}

# provision_host NAME: run NAME's script as Vagrant's shell provisioner does: the
# script copied to /tmp/vagrant-shell, the environment given to a root login
# shell on its standard input (not on a command line, where ps would show it).
provision_host() {
  local name="$1" key log
  log="$(host_dir "$name")/provision.log"
  host_exec "$name" install -m 0700 /dev/stdin /tmp/vagrant-shell \
    <"$REPO_DIR/scripts/${HOST_SCRIPT[$name]}"
  {
    for key in "${VM_ENV_KEYS[@]}"; do
      printf 'export %s=%q\n' "$key" "${VM_ENV[$key]}"
    done
    printf 'exec /tmp/vagrant-shell\n'
  } | host_exec "$name" bash -l >>"$log" 2>&1
}

# provision NAME...: every host but the last in parallel, then the last (the
# Vagrantfile lists the gateway last; it waits for the others itself).
provision() {
  local name entry last="${NAMES[-1]}" first=() pids=() failed=() start=$SECONDS
  for name in "$@"; do
    sync_repo "$name"
    [[ "$name" == "$last" ]] || first+=("$name")
  done
  for name in "${first[@]}"; do
    log "$name: provisioning with ${HOST_SCRIPT[$name]} (log: $(host_dir "$name")/provision.log)"
    provision_host "$name" &
    pids+=("$!:$name")
  done
  for entry in "${pids[@]}"; do
    wait "${entry%%:*}" || failed+=("${entry#*:}")
  done
  if ((${#first[@]} > 0)); then
    log "timing: provision ${first[*]} $((SECONDS - start)) s"
  fi
  if ((${#failed[@]} == 0)) && [[ " $* " == *" $last "* ]]; then
    start=$SECONDS
    log "$last: provisioning with ${HOST_SCRIPT[$last]} (log: $(host_dir "$last")/provision.log)"
    provision_host "$last" || failed+=("$last")
    log "timing: provision $last $((SECONDS - start)) s"
  fi
  for name in "${failed[@]}"; do
    tail -n 40 "$(host_dir "$name")/provision.log" >&2
  done
  ((${#failed[@]} == 0)) || die "provisioning failed on: ${failed[*]}"
}

# --- Commands ---

cmd_up() {
  local base registries name start
  start=$SECONDS
  apt_install debootstrap
  apt_install systemd-container
  apt_install nftables
  command -v npm >/dev/null || apt_install npm
  python3 -c "import pip" 2>/dev/null || apt_install python3-pip
  base="$(ensure_base)"
  log "timing: base $((SECONDS - start)) s"
  start=$SECONDS
  registries="$(registry_addresses)"
  ensure_network "$registries"
  log "network: $BRIDGE $BRIDGE_IP, registries reached: $(awk '{ print $2 }' <<<"$registries" | sort -u | paste -sd' ' -)"
  for name in "${NAMES[@]}"; do
    prepare_host "$name" "$base" "$registries"
    boot_host "$name"
    log "$name: booted on ${HOST_IP[$name]}"
  done
  log "timing: network and boot $((SECONDS - start)) s"
  provision "${NAMES[@]}"
  log "up: gateway at http://${HOST_IP[${NAMES[-1]}]}:${VM_ENV[GATEWAY_PORT]:-3000}"
}

cmd_down() {
  local name start=$SECONDS
  for name in "${ALL_NAMES[@]}"; do
    stop_host "$name"
  done
  NAMES=("${ALL_NAMES[@]}")  # remove_network: every host's namespace
  remove_network
  rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/locks /run/systemd/nspawn \
    "$STATE_DIR" "$(dirname "$STATE_DIR")" 2>/dev/null || true
  log "timing: down $((SECONDS - start)) s"
}

cmd_status() {
  local name state
  for name in "${NAMES[@]}"; do
    if host_leader "$name" >/dev/null; then
      state="$(host_exec "$name" systemctl is-system-running 2>/dev/null || true)"
      printf '%-14s %-15s %s\n' "$name" "${HOST_IP[$name]}" "$state"
      host_exec "$name" bash -lc 'command -v pm2 >/dev/null && pm2 list --no-color || true'
    else
      printf '%-14s %-15s %s\n' "$name" "${HOST_IP[$name]}" "not running"
    fi
  done
}

cmd_reboot() {
  local name="$1" old
  old="$(host_leader "$name")" || die "$name is not running"
  log "$name: systemctl reboot"
  host_exec "$name" systemctl reboot
  wait_booted "$name" "$old"
  log "$name: back up"
}

# require_name NAME: NAME is a host of the Vagrantfile (a cluster's too, so
# that `exec` reaches one that runs whatever CLUSTER says now).
require_name() {
  [[ -n "${1:-}" && " ${ALL_NAMES[*]} " == *" $1 "* ]] ||
    die "unknown host '${1:-}' (one of: ${ALL_NAMES[*]})"
}

main() {
  local command="${1:-}" name
  shift || true
  if [[ "$command" == check ]]; then
    check_support
    return
  fi
  load_machines
  if [[ "$command" == env ]]; then
    for name in "${VM_ENV_KEYS[@]}"; do
      printf '%s=%s\n' "$name" "${VM_ENV[$name]}"
    done
    return
  fi
  [[ "$(id -u)" == 0 ]] || die "run as root: sudo $0 $command"
  case "$command" in
    up | down | provision)
      exec 9>"$LOCK_FILE"
      flock -n 9 || die "another scripts/hosts.sh up/down/provision is running"
      case "$command" in
        up) cmd_up ;;
        down) cmd_down ;;
        provision)
          (($# > 0)) || set -- "${NAMES[@]}"
          for name in "$@"; do require_name "$name"; done
          provision "$@"
          ;;
      esac
      ;;
    status) cmd_status ;;
    reboot)
      require_name "${1:-}"
      cmd_reboot "$1"
      ;;
    shell)
      require_name "${1:-}"
      host_exec "$1" bash -l
      ;;
    exec)
      require_name "${1:-}"
      name="$1"
      shift
      [[ "${1:-}" == -- ]] && shift
      (($# > 0)) || die "usage: $0 exec NAME -- CMD..."
      host_exec "$name" "$@"
      ;;
    _power) power "$1" ;;
    *)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
      exit 2
      ;;
  esac
}

# Sourced (tests/unit/test_env_grammar.py reads .env with read_env_file): no command.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
