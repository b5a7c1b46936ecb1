"""The Vagrantfile as committed, run by Vagrant itself under a real hypervisor.

scripts/libvirt.sh starts libvirt (QEMU's software emulation: no hardware
virtualization here) and adds a Debian 12 box built from Debian's packages
under the Vagrantfile's pinned name and version. Then the reviewer's commands:
vagrant up --provider=libvirt, vagrant status, the audit from 192.168.56.1
with psql and pm2 through vagrant ssh, the Postman collection, vagrant
provision again, vagrant reload billing-vm, vagrant destroy -f; and nothing of
it is left (domains, volumes, networks, daemons, firewall tables), also when a
step fails.

MOVIE_SHOP_BOX picks the box: warm (the default, CI's: the packages the
scripts install are in it, so provisioning under emulation only configures)
or bare (a reviewer's cold start: provisioning installs everything).
The figures print in the "three hosts" section at the end of the run.
"""

import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

import helpers
import pytest
from helpers_hosts import APP_OF
from helpers_hosts import BILLING_DB
from helpers_hosts import BILLING_VM
from helpers_hosts import BRIDGE_IP
from helpers_hosts import GATEWAY_IP
from helpers_hosts import INVENTORY_VM
from helpers_hosts import MOVIES_DB
from helpers_hosts import ROOT
from helpers_hosts import Summary
from helpers_hosts import figure
from helpers_hosts import gateway_healthy
from helpers_hosts import on
from helpers_hosts import order
from helpers_hosts import orders_of
from helpers_hosts import pm2_apps
from helpers_hosts import psql
from helpers_hosts import reached_by
from helpers_hosts import replay_audit
from helpers_hosts import request

LIBVIRT = ROOT / "scripts" / "libvirt.sh"
BOX = os.environ.get("MOVIE_SHOP_BOX", "warm")
NAMES = (INVENTORY_VM, BILLING_VM, "gateway-vm")
# Under emulation a VM is ten to twenty times slower than this machine.
PATIENCE = 6
COUNTS = "SELECT count(*), coalesce(max(id), 0) FROM "
# What libvirt runs: gone at the end unless it ran before.
DAEMONS = ("libvirtd", "virtlogd", "dnsmasq", "qemu-system-x86")
# Vagrant's own progress meter, rewritten in place with carriage returns.
PROGRESS = re.compile(r"Progress: \d+%")


def libvirt(*args, timeout=120):
    """Run scripts/libvirt.sh; return the completed process."""
    return subprocess.run(
        [str(LIBVIRT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def vagrant_env():
    """This environment for Vagrant, without HashiCorp's version check (no
    traffic leaves this machine but to the VMs) and without a CLUSTER of
    the caller's: the Vagrantfile and .env decide, as for a reviewer."""
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1"}
    env.pop("CLUSTER", None)
    return env


def vagrant(*args, timeout=120, stdin=None):
    """Run vagrant in the repository; return the completed process."""
    return subprocess.run(
        ["vagrant", *args],
        cwd=ROOT,
        env=vagrant_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def vagrant_timed(*args, timeout=2400):
    """Run vagrant, stamping each line of its output with the seconds since
    the start; return (return code, [(seconds, line)])."""
    start = time.monotonic()
    lines = []
    with subprocess.Popen(
        ["vagrant", *args],
        cwd=ROOT,
        env=vagrant_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        # A Vagrant that hangs silently is killed all the same.
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.replace("\r", "").replace("\x1b[K", "")
                line = PROGRESS.sub("", line).rstrip()
                if line:
                    lines.append((time.monotonic() - start, line))
            code = proc.wait()
        finally:
            watchdog.cancel()
    return code, lines


def tail(lines, count=60):
    """The last lines of a stamped output, as text."""
    return "\n".join(f"{t:6.0f} {line}" for t, line in lines[-count:])


def phases(lines, name):
    """{phase: seconds since the start} for machine name in vagrant up's output."""
    marks = {
        "started": "Starting domain.",
        "address": "Waiting for machine to boot.",
        "ssh": "Machine booted and ready!",
        "provision": "Running provisioner: shell...",
    }
    seen = {}
    mine = re.compile(rf"\s*(==> )?{re.escape(name)}: ")
    for t, line in lines:
        if not mine.match(line):
            continue
        for phase, text in marks.items():
            if text in line and phase not in seen:
                seen[phase] = t
        seen["end"] = t
    return seen


def vagrant_ssh(name, cmd, timeout, stdin):
    """cmd as root on VM name, through vagrant ssh (as the audit's psql and pm2)."""
    command = list(cmd) if cmd[0] == "sudo" else ["sudo", *cmd]
    return vagrant("ssh", name, "-c", shlex.join(command), timeout=timeout, stdin=stdin)


def leftovers():
    """What libvirt and this module may leave, as text, to compare before and after."""
    checks = {
        "links": ["ip", "-o", "link"],
        "tables": ["nft", "list", "tables"],
        "daemons": ["ps", "-e", "-o", "comm="],
    }
    seen = {}
    for key, cmd in checks.items():
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        if key == "links":
            out = "\n".join(
                line.split(": ")[1].split("@")[0] for line in out.splitlines()
            )
        elif key == "daemons":
            out = "\n".join(c for c in out.split() if c in DAEMONS)
        seen[key] = sorted(out.splitlines())
    seen["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    return seen


@pytest.fixture(scope="module")
def vms(pytestconfig):
    """The three VMs, up from the box by `vagrant up`; destroyed afterwards."""
    if not pytestconfig.pluginmanager.has_plugin("three-hosts-summary"):
        pytestconfig.pluginmanager.register(Summary(), "three-hosts-summary")
    check = libvirt("check")
    if check.returncode == 3:
        pytest.skip(check.stdout.strip())
    assert check.returncode == 0, check.stdout + check.stderr
    # An earlier run's VMs, if it was killed.
    vagrant("destroy", "-f", timeout=300)
    assert libvirt("stop", timeout=300).returncode == 0
    before = leftovers()
    try:
        start = time.monotonic()
        proc = libvirt("start", timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = libvirt("box", BOX, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        figure(
            f"vagrant: libvirt and the {BOX} box ready in {time.monotonic() - start:.0f} s"
        )
        for line in proc.stdout.splitlines():
            if line.startswith("==> timing: "):
                figure("  " + line.removeprefix("==> timing: "))
        code, lines = vagrant_timed("up", "--provider=libvirt", timeout=3600)
        assert code == 0, tail(lines)
        figure(
            f"vagrant up --provider=libvirt: {lines[-1][0]:.0f} s ({BOX} box, three VMs at once)"
        )
        for name in NAMES:
            seen = phases(lines, name)
            figure(
                f"  {name}: address {seen['address'] - seen['started']:.0f} s,"
                f" SSH {seen['ssh'] - seen['started']:.0f} s after the domain started;"
                f" provisioning {seen['end'] - seen['provision']:.0f} s"
            )
        yield lines
    finally:
        start = time.monotonic()
        destroy = vagrant("destroy", "-f", timeout=600)
        figure(f"vagrant destroy -f: {time.monotonic() - start:.0f} s")
        stop = libvirt("stop", timeout=300)
        assert destroy.returncode == 0, destroy.stdout + destroy.stderr
        assert stop.returncode == 0, stop.stdout + stop.stderr
        virsh = subprocess.run(
            ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert virsh.returncode != 0 or not [
            d for d in virsh.stdout.split() if d.endswith(NAMES)
        ], virsh.stdout
        assert not list(Path("/var/lib/libvirt/images").glob("*")), "volumes left"
        assert leftovers() == before


def test_vagrant_up_and_status(vms):
    """Three VMs running, provisioned, the gateway healthy from 192.168.56.1."""
    proc = vagrant("status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in NAMES:
        assert re.search(rf"^{name}\s+running \(libvirt\)$", proc.stdout, re.M), (
            proc.stdout
        )
    route = subprocess.run(
        ["ip", "-o", "route", "get", GATEWAY_IP],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"src {BRIDGE_IP}" in route, route
    helpers.wait_for(gateway_healthy, 120, interval=1, what="the gateway's /health 200")
    figure(
        f"vagrant status: {', '.join(NAMES)} running (libvirt); /health 200 from {BRIDGE_IP}"
    )


def test_audit_through_vagrant(vms):
    """The audit as the reviewer runs it: curl from 192.168.56.1, pm2 and psql
    through vagrant ssh, newman with the vagrant environment."""
    start = time.monotonic()
    with reached_by(vagrant_ssh):
        replay_audit(lambda text: figure(f"vagrant audit: {text}"), patience=PATIENCE)
    figure(f"vagrant audit: every step passed in {time.monotonic() - start:.0f} s")


def test_provision_again_changes_nothing(vms):
    """vagrant provision on running VMs: same rows, apps online, healthy."""
    with reached_by(vagrant_ssh):
        movies = psql(INVENTORY_VM, MOVIES_DB, COUNTS + "movies")
        orders = psql(BILLING_VM, BILLING_DB, COUNTS + "orders")
        code, lines = vagrant_timed("provision", timeout=1800)
        assert code == 0, tail(lines)
        assert psql(INVENTORY_VM, MOVIES_DB, COUNTS + "movies") == movies
        assert psql(BILLING_VM, BILLING_DB, COUNTS + "orders") == orders
        for name, app in APP_OF.items():
            assert pm2_apps(name)[app][0] == "online", name
    helpers.wait_for(gateway_healthy, 120, interval=1, what="the gateway's /health 200")
    figure(
        f"vagrant provision: {lines[-1][0]:.0f} s; movies {movies[0]} and orders"
        f" {orders[0]} (count, max id) unchanged; apps online"
    )


def test_reload_brings_billing_back(vms):
    """vagrant reload billing-vm: PM2 starts billing_app at boot; every order
    accepted before is still there, and a new one is stored."""
    with reached_by(vagrant_ssh):
        orders = psql(BILLING_VM, BILLING_DB, COUNTS + "orders")
        reload_start = time.monotonic()
        code, lines = vagrant_timed("reload", BILLING_VM, timeout=1200)
        assert code == 0, tail(lines)
        # Asked before PM2's unit ran, `pm2 jlist` would start a daemon of its own.
        booted = on(
            BILLING_VM,
            "systemctl",
            "is-system-running",
            "--wait",
            timeout=600,
            check=False,
        )
        assert booted.strip() in ("running", "degraded"), booted
        apps = pm2_apps(BILLING_VM)
        assert apps["billing_app"][0] == "online", apps
        assert psql(BILLING_VM, BILLING_DB, COUNTS + "orders") == orders
        try:
            helpers.wait_for(
                gateway_healthy, 600, interval=2, what="/health 200 after the reload"
            )
        except BaseException:
            print("/health:", request("GET", "/health"))
            for name, app in (
                ("gateway-vm", "api_gateway"),
                (BILLING_VM, "billing_app"),
            ):
                print(
                    on(
                        name,
                        "pm2",
                        "logs",
                        app,
                        "--lines",
                        "20",
                        "--nostream",
                        check=False,
                    )
                )
            print(on(BILLING_VM, "ss", "-tnp", check=False))
            raise
        back = time.monotonic() - reload_start
        user = 900 + int(time.time()) % 99
        assert order(user) == 200
        helpers.wait_for(
            lambda: orders_of([user]) == {user: 1},
            300,
            interval=5,
            what="an order after the reload stored",
        )
    figure(
        f"vagrant reload {BILLING_VM}: {lines[-1][0]:.0f} s, /health 200 again"
        f" {back:.0f} s after it began (RabbitMQ's start under emulation); billing_app online (PM2 at boot),"
        f" orders {orders[0]} kept, a new order stored once"
    )
