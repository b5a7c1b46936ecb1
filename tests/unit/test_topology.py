"""The cluster topology is spelt alike in the Vagrantfile, scripts/hosts.sh
and scripts/lib.sh: the same hosts, the same addresses, and nothing added
without CLUSTER=1."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINE = re.compile(
    r'^\s*"([a-z0-9-]+)"\s*=>\s*\{\s*ip:\s*ENV_FILE\["([A-Z0-9_]+)"\],'
    r'\s*script:\s*"([a-z.]+)"(, cluster: true)?',
    re.MULTILINE,
)


def vagrant_machines():
    """(name, address setting, script, cluster) of the Vagrantfile's MACHINES."""
    text = (ROOT / "Vagrantfile").read_text()
    return [(n, k, s, bool(c)) for n, k, s, c in MACHINE.findall(text)]


def bash(script, **env):
    return subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def test_hosts_sh_makes_the_vagrantfiles_machines_with_and_without_cluster():
    machines = vagrant_machines()
    script = 'source scripts/hosts.sh; load_machines; echo "${NAMES[@]}"'
    assert bash(script, CLUSTER="0") == [n for n, _, _, c in machines if not c]
    assert bash(script, CLUSTER="1") == [n for n, _, _, _ in machines]
    assert len(machines) == 6


def test_rabbitmq_nodes_are_the_vagrantfiles_billing_hosts():
    billing = [(n, k) for n, k, s, _ in vagrant_machines() if s == "billing.sh"]
    nodes = bash('source scripts/lib.sh; echo "${CLUSTER_NODES[@]}"')
    assert nodes == [f"{n}:{k}" for n, k in billing]


def test_the_topology_lists_every_billing_host_and_inventory_in_cluster_only():
    machines = vagrant_machines()
    script = "source scripts/lib.sh; load_env; apply_topology; "
    script += 'echo "${RABBITMQ_HOSTS:-none} ${INVENTORY_HOSTS:-none} ${RABBITMQ_QUEUE_TYPE:-none}"'
    assert bash(script, CLUSTER="0") == ["none", "none", "none"]
    env = dict(
        line.split("=", 1) for line in bash("scripts/hosts.sh env") if "=" in line
    )
    rabbit, inventories, kind = bash(script, CLUSTER="1")
    addresses = {
        s: [env[k] for _, k, sc, _ in machines if sc == s]
        for s in ("billing.sh", "inventory.sh")
    }
    assert rabbit.split(",") == addresses["billing.sh"]
    assert inventories.split(",") == addresses["inventory.sh"]
    assert kind == "quorum"
