#!/usr/bin/env bash
# The Vagrantfile's VMs under libvirt and QEMU on this Linux machine, as
# tests/hosts/test_vagrant.py runs them. Run as root.
#
#   scripts/libvirt.sh start       libvirt's daemons (started here when no systemd runs
#                                  them), QEMU as root without a security driver, and
#                                  the fence: the VMs reach each other and the package
#                                  registries, nothing else
#   scripts/libvirt.sh box [warm]  build (or reuse) a Debian 12 box from Debian's packages
#                                  and add it as the Vagrantfile's box and version, for
#                                  libvirt; warm: with what the provisioning scripts
#                                  install already installed (they then only configure)
#   scripts/libvirt.sh stop        remove what Vagrant left in libvirt (domains, volumes,
#                                  networks), the box, the daemons `start` started, the
#                                  fence, libvirt's empty firewall tables; safe to repeat
#   scripts/libvirt.sh check       exit 3 with the reason if the VMs cannot run here
#
# Then, as a reviewer: vagrant up --provider=libvirt. The box is for testing
# here, where the official debian/bookworm64 cannot be downloaded; it boots its
# kernel directly (no boot loader) and forces QEMU's software emulation (TCG).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
# hosts.sh: the Vagrantfile's machines, this machine's mirror and registries.
# shellcheck source-path=SCRIPTDIR source=hosts.sh
source "$REPO_DIR/scripts/hosts.sh"

BOX_CACHE=/var/cache/movie-shop/box
LIBVIRT_STATE=/var/lib/movie-shop/libvirt
FENCE_TABLE=movie_shop_vagrant
QEMU_CONF=/etc/libvirt/qemu.conf
BOX_MARK="# Built by scripts/libvirt.sh"
# vagrant-libvirt's management network (its default), and the Vagrantfile's.
MANAGEMENT_SUBNET=192.168.121.0/24
# What the box has; BOX_PACKAGES as in a Vagrant box of Debian 12.
BOX_PACKAGES=(
  ca-certificates
  dbus
  ifupdown
  initramfs-tools
  iproute2
  isc-dhcp-client
  linux-image-amd64
  netbase
  openssh-server
  procps
  python3
  rsync
  sudo
  systemd
  systemd-sysv
)
BOX_DISK_GB=20
KERNEL_CMDLINE="root=/dev/vda rw rootfstype=ext4 net.ifnames=0 console=ttyS0"

# box_name, box_version: the Vagrantfile's pin.
box_name() {
  sed -n 's/^[[:space:]]*config\.vm\.box[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$REPO_DIR/Vagrantfile"
}

box_version() {
  sed -n 's/^[[:space:]]*config\.vm\.box_version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$REPO_DIR/Vagrantfile"
}

# warm_packages: what the provisioning scripts apt_install, read from them.
warm_packages() {
  grep -ho 'apt_install [a-z0-9][a-z0-9.+-]*' \
    "$REPO_DIR"/scripts/{lib,billing,inventory,gateway}.sh | awk '{ print $2 }' | sort -u
}

# in_root ROOT CMD...: CMD inside ROOT (its own /proc and /dev), on this machine's network.
in_root() {
  local root="$1"
  shift
  systemd-nspawn --quiet --directory="$root" --register=no --keep-unit \
    --resolv-conf=replace-host --timezone=off --link-journal=no \
    --setenv=DEBIAN_FRONTEND=noninteractive "$@"
}

# insecure_key: the public half of Vagrant's insecure key pair, as the vagrant package ships it.
insecure_key() {
  local key
  key="$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant /usr/share/vagrant \
    -path '*/keys/vagrant.pub' 2>/dev/null | head -n 1)"
  [[ -n "$key" ]] || die "Vagrant's insecure public key (keys/vagrant.pub) was not found"
  printf '%s\n' "$key"
}

# configure_box ROOT: a Vagrant box's conventions: the vagrant user with
# password-less sudo and the insecure key, DHCP on eth0 with ifupdown, SSH with
# host keys made at first boot, no machine id (each VM makes its own).
configure_box() {
  local root="$1"
  printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$root/etc/fstab"
  printf 'debian\n' >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  cat >"$root/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
EOF
  chroot "$root" useradd --create-home --shell /bin/bash vagrant
  printf 'vagrant ALL=(ALL) NOPASSWD: ALL\n' >"$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"
  install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
  install -m 0600 -o 1000 -g 1000 "$(insecure_key)" "$root/home/vagrant/.ssh/authorized_keys"
  printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
  rm -f "$root"/etc/ssh/ssh_host_*
  cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=SSH host keys of this machine
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
RequiredBy=ssh.service
EOF
  chroot "$root" systemctl enable ssh-host-keys.service >/dev/null 2>&1
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
}

# warm_box ROOT: install natively what the provisioning scripts would install
# under emulation, with their own functions: the packages, PM2, the virtualenvs.
warm_box() {
  local root="$1" venv_root packages
  venv_root="${VM_ENV[VENV_ROOT]:-/opt/movie-shop/venv}"
  packages="$(warm_packages | paste -sd' ' -)"
  # No service starts while the packages install (no systemd runs here).
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  in_root "$root" --bind-ro="$REPO_DIR:/mnt/movie-shop" \
    --setenv=REPO_DIR=/mnt/movie-shop --setenv=VENV_ROOT="$venv_root" \
    bash -c "source /mnt/movie-shop/scripts/lib.sh
      apt_install $packages
      ensure_node_pm2
      for service in billing gateway inventory; do ensure_venv \$service; done
      apt-get clean
      rm -rf /root/.cache /root/.npm"
  rm -f "$root/usr/sbin/policy-rc.d"
  # As after an apt install on the VM, but for two things this machine changed:
  # its own PostgreSQL made the box's cluster take the next free port, and
  # no service may start at boot before its role's script configures it.
  sed -i 's/^port = .*/port = 5432/' "$root"/etc/postgresql/*/main/postgresql.conf
  systemctl --root="$root" disable --quiet postgresql.service rabbitmq-server.service epmd.socket
}

# box_key KIND: what the box is made of, hashed: it names the cached box.
box_key() {
  {
    printf '%s\n' "$1" "$SUITE" "$(apt_mirror | head -n 1)" "$(box_name)" "$(box_version)"
    declare -p BOX_PACKAGES BOX_DISK_GB KERNEL_CMDLINE BOX_MARK
    declare -f build_box configure_box warm_box warm_packages copy_registry_settings
    if [[ "$1" == warm ]]; then
      cat "$REPO_DIR"/scripts/{lib,billing,inventory,gateway}.sh "$REPO_DIR"/requirements-*.txt "$REPO_DIR/vm.env"
    fi
  } | sha256sum | cut -c1-16
}

# --- The box ---

# build_box KIND DIR: the box (DIR/box.box) and its catalog (DIR/catalog.json).
build_box() {
  local kind="$1" dir="$2" root mirror kernel initrd size
  mirror="$(apt_mirror | head -n 1)"
  [[ -n "$mirror" ]] || die "no apt source for $SUITE on this machine"
  root="$dir/root"
  log "box: debootstrap $SUITE from $mirror ($kind)"
  if ! debootstrap --variant=minbase --include="$(IFS=,; echo "${BOX_PACKAGES[*]}")" \
    "$SUITE" "$root" "$mirror" >"$dir/debootstrap.log" 2>&1; then
    tail -n 20 "$dir/debootstrap.log" >&2
    die "debootstrap failed (log: $dir/debootstrap.log)"
  fi
  copy_registry_settings "$root"
  configure_box "$root"
  if [[ "$kind" == warm ]]; then
    log "box: installing what the provisioning scripts install: $(warm_packages | paste -sd' ' -), pm2, the virtualenvs"
    warm_box "$root" >"$dir/warm.log" 2>&1 || {
      tail -n 20 "$dir/warm.log" >&2
      die "warming the box failed (log: $dir/warm.log)"
    }
  fi
  kernel="$(find "$root/boot" -name 'vmlinuz-*' | sort -V | tail -n 1)"
  initrd="$(find "$root/boot" -name 'initrd.img-*' | sort -V | tail -n 1)"
  [[ -f "$kernel" && -f "$initrd" ]] || die "the box has no kernel or initrd in /boot"
  mkdir -p "$dir/box"
  cp "$kernel" "$dir/box/vmlinuz"
  cp "$initrd" "$dir/box/initrd.img"
  log "box: the disk image"
  truncate -s "${BOX_DISK_GB}G" "$dir/disk.raw"
  mkfs.ext4 -q -F -L root -d "$root" "$dir/disk.raw"
  qemu-img convert -O qcow2 "$dir/disk.raw" "$dir/box/box.img"
  rm -f "$dir/disk.raw"
  rm -rf "$root"
  size="$(qemu-img info --output=json "$dir/box/box.img" | python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"] // 2**30)')"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$size" >"$dir/box/metadata.json"
  # The box's own Vagrantfile: direct kernel boot from the box's folder, QEMU's TCG.
  cat >"$dir/box/Vagrantfile" <<EOF
$BOX_MARK ($kind) for testing on a machine without hardware virtualization.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "qemu"
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "$KERNEL_CMDLINE"
  end
end
EOF
  tar -C "$dir/box" -cf "$dir/box.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
  rm -rf "$dir/box"
  # A catalog gives the box the Vagrantfile's version (a plain file would get 0).
  cat >"$dir/catalog.json" <<EOF
{"name": "$(box_name)", "versions": [{"version": "$(box_version)", "providers": [
  {"name": "libvirt", "url": "file://$dir/box.box", "checksum_type": "sha256",
   "checksum": "$(sha256sum "$dir/box.box" | cut -d' ' -f1)"}]}]}
EOF
}

# ensure_box KIND: the cached box of KIND, built if missing; prints its folder.
ensure_box() {
  local kind="$1" key dir tmp old
  key="$(box_key "$kind")"
  dir="$BOX_CACHE/$kind-$key"
  if [[ ! -f "$dir/.complete" ]]; then
    mkdir -p "$BOX_CACHE"
    tmp="$(mktemp -d "$BOX_CACHE/.build-XXXXXX")"
    # shellcheck disable=SC2064  # the folder is known now
    trap "rm -rf '$tmp'" EXIT
    build_box "$kind" "$tmp" >&2
    sed -i "s#file://$tmp/#file://$dir/#" "$tmp/catalog.json"
    touch "$tmp/.complete"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    trap - EXIT
    for old in "$BOX_CACHE"/"$kind"-*; do
      [[ "$old" == "$dir" ]] || rm -rf "$old"
    done
  fi
  printf '%s\n' "$dir"
}

cmd_box() {
  local kind="${1:-bare}" dir start=$SECONDS
  [[ "$kind" == bare || "$kind" == warm ]] || die "box: bare or warm, not '$kind'"
  apt_install debootstrap
  apt_install systemd-container
  apt_install qemu-utils
  apt_install e2fsprogs
  apt_install vagrant
  apt_install vagrant-libvirt
  dir="$(ensure_box "$kind")"
  log "timing: box $((SECONDS - start)) s ($dir)"
  start=$SECONDS
  vagrant box add --force --provider=libvirt "$dir/catalog.json" >/dev/null
  log "timing: vagrant box add $((SECONDS - start)) s: $(box_name) $(box_version) ($kind)"
}

# --- libvirt ---

# started_daemons: the daemons this script started (their PID files), still running.
started_daemons() {
  local file
  for file in "$LIBVIRT_STATE"/*.pid; do
    [[ -f "$file" ]] && basename "$file" .pid
  done
  return 0
}

# set_qemu_conf KEY VALUE: KEY = VALUE in qemu.conf (the original is kept for stop).
set_qemu_conf() {
  [[ -f "$LIBVIRT_STATE/qemu.conf" ]] || cp "$QEMU_CONF" "$LIBVIRT_STATE/qemu.conf"
  sed -i "/^[#[:space:]]*$1[[:space:]]*=/d" "$QEMU_CONF"
  printf '%s = %s\n' "$1" "$2" >>"$QEMU_CONF"
}

ensure_fence() {
  local elements subnet
  subnet="${HOST_IP[${NAMES[0]}]%.*}.0/24"
  elements="$(registry_addresses | awk '{ print $1 }' | sort -u | paste -sd, -)"
  [[ -n "$elements" ]] || die "no package registry address could be resolved"
  nft delete table inet "$FENCE_TABLE" 2>/dev/null || true
  # Accepting here does not override libvirt's own tables; dropping does.
  nft -f - <<NFT
table inet $FENCE_TABLE {
  set registries {
    type ipv4_addr
    elements = { $elements }
  }
  set vms {
    type ipv4_addr
    flags interval
    elements = { $MANAGEMENT_SUBNET, $subnet }
  }
  chain forward {
    type filter hook forward priority 0; policy accept;
    ip saddr @vms ip daddr @vms accept
    ip saddr @vms ip daddr @registries tcp dport { 80, 443 } accept
    ip daddr @vms ct state established,related accept
    ip saddr @vms drop
    ip daddr @vms drop
  }
  chain input {
    type filter hook input priority 0; policy accept;
    # DHCP and DNS from libvirt's dnsmasq; answers to what this machine opened.
    iifname "virbr*" udp dport { 53, 67 } accept
    iifname "virbr*" tcp dport 53 accept
    ip saddr @vms ct state established,related accept
    ip saddr @vms drop
  }
}
NFT
}

cmd_start() {
  local daemon tries
  apt_install vagrant
  apt_install vagrant-libvirt
  apt_install libvirt-daemon-system
  apt_install qemu-system-x86
  apt_install dnsmasq-base
  apt_install rsync
  apt_install nftables
  mkdir -p "$LIBVIRT_STATE"
  [[ -f "$LIBVIRT_STATE/ip_forward" ]] || cat /proc/sys/net/ipv4/ip_forward >"$LIBVIRT_STATE/ip_forward"
  [[ -f "$LIBVIRT_STATE/tables" ]] || nft list tables >"$LIBVIRT_STATE/tables"
  # The box's kernel lies in root's Vagrant home; no AppArmor or SELinux here.
  set_qemu_conf user '"root"'
  set_qemu_conf group '"root"'
  set_qemu_conf security_driver '"none"'
  if ! is_systemd; then
    for daemon in virtlogd libvirtd; do
      if ! pgrep -x "$daemon" >/dev/null; then
        "$daemon" --daemon --pid-file="$LIBVIRT_STATE/$daemon.pid"
        log "libvirt: started $daemon"
      fi
    done
  else
    systemctl start libvirtd
  fi
  for ((tries = 0; tries < 100; tries++)); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
  done
  virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer"
  # libvirtd reads qemu.conf when it starts: one already running must read it again.
  if [[ -z "$(started_daemons)" ]] && is_systemd; then
    systemctl restart libvirtd
  fi
  ensure_fence
  log "libvirt: ready (qemu:///system); the VMs reach each other and the registries only"
}

# domain_names: libvirt's domains of this Vagrantfile (vagrant-libvirt names them PREFIX_MACHINE).
domain_names() {
  local domain name
  while read -r domain; do
    for name in "${ALL_NAMES[@]}"; do
      if [[ "$domain" == *_"$name" ]]; then printf '%s\n' "$domain"; fi
    done
  done < <(virsh -c qemu:///system list --all --name 2>/dev/null)
  return 0
}

cmd_stop() {
  local domain volume network pool daemon pid table
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    while read -r domain; do
      [[ -n "$domain" ]] || continue
      virsh -c qemu:///system destroy "$domain" >/dev/null 2>&1 || true
      virsh -c qemu:///system undefine "$domain" --remove-all-storage --nvram >/dev/null 2>&1 ||
        virsh -c qemu:///system undefine "$domain" --remove-all-storage >/dev/null 2>&1 || true
      log "libvirt: removed domain $domain"
    done < <(domain_names)
    for pool in $(virsh -c qemu:///system pool-list --name 2>/dev/null); do
      while read -r volume; do
        [[ -n "$volume" ]] || continue
        virsh -c qemu:///system vol-delete --pool "$pool" "$volume" >/dev/null
        log "libvirt: removed volume $volume"
      done < <(virsh -c qemu:///system vol-list --pool "$pool" 2>/dev/null |
        awk -v box="$(box_name | sed 's#/#-VAGRANTSLASH-#')_vagrant_box_image_" \
          'NR > 2 && $1 != "" && index($1, box) == 1 { print $1 }')
    done
    # The networks vagrant-libvirt made and leaves (and, with daemons started
    # here, every network they run: their dnsmasq outlives the daemon).
    for network in $(virsh -c qemu:///system net-list --all --name 2>/dev/null); do
      if [[ "$network" == vagrant-libvirt || "$network" == movie-shop* ]] ||
        { [[ -n "$(started_daemons)" ]] && virsh -c qemu:///system net-info "$network" 2>/dev/null | grep -q '^Active:.*yes'; }; then
        virsh -c qemu:///system net-destroy "$network" >/dev/null 2>&1 || true
        [[ "$network" == default ]] || virsh -c qemu:///system net-undefine "$network" >/dev/null 2>&1 || true
        log "libvirt: removed network $network"
      fi
    done
  fi
  if [[ -f "$HOME/.vagrant.d/boxes/$(box_name | sed 's#/#-VAGRANTSLASH-#')/$(box_version)/libvirt/Vagrantfile" ]] &&
    grep -qF "$BOX_MARK" "$HOME/.vagrant.d/boxes/$(box_name | sed 's#/#-VAGRANTSLASH-#')/$(box_version)/libvirt/Vagrantfile"; then
    vagrant box remove --force --provider=libvirt --box-version="$(box_version)" "$(box_name)" >/dev/null
    log "vagrant: removed the box built here"
  fi
  for daemon in libvirtd virtlogd; do
    pid="$(cat "$LIBVIRT_STATE/$daemon.pid" 2>/dev/null)" || continue
    kill -TERM "$pid" 2>/dev/null || true
    for ((tries = 0; tries < 50; tries++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$LIBVIRT_STATE/$daemon.pid"
    log "libvirt: stopped $daemon"
  done
  nft delete table inet "$FENCE_TABLE" 2>/dev/null || true
  # The firewall tables libvirt made (through iptables) and left with empty
  # chains: those `start` did not find, holding nothing but jumps to them.
  if [[ -f "$LIBVIRT_STATE/tables" ]] && ! pgrep -x libvirtd >/dev/null; then
    while read -r table; do
      grep -qxF "$table" "$LIBVIRT_STATE/tables" && continue
      # shellcheck disable=SC2086  # "table FAMILY NAME"
      if ! nft list $table | grep -vqE '^[[:space:]]*(table .*|chain .*|type .*|(counter .* )?jump LIBVIRT_[A-Z]+|\}|)$'; then
        nft delete $table
      fi
    done < <(nft list tables)
    rm -f "$LIBVIRT_STATE/tables"
  fi
  if [[ -f "$LIBVIRT_STATE/qemu.conf" ]]; then
    cp "$LIBVIRT_STATE/qemu.conf" "$QEMU_CONF"
    rm -f "$LIBVIRT_STATE/qemu.conf"
  fi
  if [[ -f "$LIBVIRT_STATE/ip_forward" ]]; then
    cat "$LIBVIRT_STATE/ip_forward" >/proc/sys/net/ipv4/ip_forward
    rm -f "$LIBVIRT_STATE/ip_forward"
  fi
  rmdir "$LIBVIRT_STATE" "$(dirname "$LIBVIRT_STATE")" 2>/dev/null || true
}

cmd_check() {
  local reason=""
  if [[ "$(uname -m)" != x86_64 ]]; then
    reason="not x86_64 (the box is amd64)"
  elif [[ "$(id -u)" != 0 ]]; then
    reason="not root (sudo $0 check)"
  elif ip -o -4 addr show | grep -q " ${BRIDGE_IP}/"; then
    reason="$BRIDGE_IP is already on an interface (scripts/hosts.sh up? scripts/hosts.sh down first)"
  fi
  if [[ -n "$reason" ]]; then
    printf 'VMs cannot run here: %s\n' "$reason"
    exit "$CANNOT"
  fi
  printf 'VMs can run here\n'
}

libvirt_main() {
  local command="${1:-}"
  shift || true
  load_machines
  case "$command" in
    check) cmd_check ;;
    start | box | stop)
      [[ "$(id -u)" == 0 ]] || die "run as root: sudo $0 $command"
      "cmd_$command" "$@"
      ;;
    *)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
      exit 2
      ;;
  esac
}

libvirt_main "$@"
