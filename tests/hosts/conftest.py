"""The three hosts, brought up once for every test module of this tier.

KEEP_HOSTS=1 in the environment runs the tests on hosts already up
(scripts/hosts.sh up) and leaves them up: for working on these tests.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import helpers
import pytest
from helpers_hosts import Summary
from helpers_hosts import figure
from helpers_hosts import gateway_healthy
from helpers_hosts import hosts


def pytest_collection_modifyitems(items):
    """test_vagrant.py first: its VMs' network and the hosts' bridge both carry
    192.168.56.1, so the VMs must be gone before three_hosts brings the hosts up
    (it stays up until the last test of this folder)."""
    items.sort(key=lambda item: item.path.name != "test_vagrant.py")


@pytest.fixture(scope="package")
def three_hosts(pytestconfig):
    """The three hosts, up and provisioned from nothing; taken down afterwards."""
    if not pytestconfig.pluginmanager.has_plugin("three-hosts-summary"):
        pytestconfig.pluginmanager.register(Summary(), "three-hosts-summary")
    check = hosts("check")
    if check.returncode == 3:
        pytest.skip(check.stdout.strip())
    assert check.returncode == 0, check.stdout + check.stderr
    if os.environ.get("KEEP_HOSTS") == "1":
        assert "not running" not in hosts("status").stdout, "scripts/hosts.sh up first"
        yield
        return
    hosts("down", timeout=300)  # leftovers of an earlier run that was killed
    ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    start = time.monotonic()
    try:
        up = hosts("up", timeout=600)
        figure(f"hosts.sh up: {time.monotonic() - start:.0f} s in all")
        for line in up.stdout.splitlines():
            if line.startswith("==> timing: "):
                figure("  " + line.removeprefix("==> timing: "))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        layers = subprocess.run(
            "du -scm /var/lib/movie-shop/hosts/*/upper | tail -n 1",
            shell=True,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        figure(
            f"  disk used by the three host layers: {layers[0] if layers else '?'} MiB"
        )
        helpers.wait_for(
            gateway_healthy,
            60,
            interval=0.5,
            what="the gateway's /health to answer 200",
        )
        yield
    finally:
        start = time.monotonic()
        down = hosts("down", timeout=300)
        figure(f"hosts.sh down: {time.monotonic() - start:.0f} s")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not Path("/var/lib/movie-shop/hosts").exists()
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == ip_forward
        for cmd in (["ip", "-o", "link"], ["ip", "netns"], ["nft", "list", "tables"]):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            assert not re.search(r"movieshop|movie-shop|movie_shop", out.stdout), out
