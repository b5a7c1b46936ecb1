"""The three hosts grown into the cluster topology (CLUSTER=1), then its faults.

Runs after the other host tests, on their hosts: orders wait in the classic
billing_queue while billing is stopped, `CLUSTER=1 scripts/hosts.sh up` adds
billing-vm-2, billing-vm-3 and inventory-vm-2 and provisions every host again
(the queue is drained into billing_db and declared a quorum queue), and the
checker of the fault tests judges the issue's five cluster faults. Throughput
through the gateway and each host's memory, before and after, go to the
summary.
"""

import concurrent.futures
import itertools
import json
import os
import re
import socket
import time
from pathlib import Path

import helpers
import pytest
from helpers_checker import call
from helpers_checker import order_body
from helpers_faultrun import run_fault
from helpers_hosts import BILLING_DB
from helpers_hosts import BILLING_VM
from helpers_hosts import BILLING_VMS
from helpers_hosts import BRIDGE_IP
from helpers_hosts import GATEWAY_VM
from helpers_hosts import figure
from helpers_hosts import gateway_healthy
from helpers_hosts import hosts
from helpers_hosts import on
from helpers_hosts import orders_of
from helpers_hosts import psql
from helpers_hosts import queue_info
from helpers_hosts import request
from helpers_injector import ALL_IP_OF
from helpers_injector import cluster_faults
from helpers_injector import heal_everything

FAULTS = cluster_faults()
QUEUED = 50  # orders waiting in the classic queue while the cluster is made
MEASURE = 5  # seconds of each throughput run
CLIENTS = 8
STATE = Path("/var/lib/movie-shop/hosts")  # scripts/hosts.sh's STATE_DIR


def throughput(label):
    """Orders/s and movie reads/s through the gateway from the reviewer's
    address (CLIENTS keep-alive clients for MEASURE seconds each)."""
    status, movie = request(
        "POST", "/api/movies", {"title": "bench", "description": "x"}
    )
    assert status == 201, movie
    users = itertools.count(9_000_000 + int(time.time()) % 1000 * 1000)
    rates = {}
    for kind, send in (
        (
            "orders",
            lambda box: call(box, "POST", "/api/billing", order_body(next(users))),
        ),
        ("movie reads", lambda box: call(box, "GET", f"/api/movies/{movie['id']}")),
    ):

        def client(send=send):
            box, done, deadline = [None], 0, time.monotonic() + MEASURE
            while time.monotonic() < deadline:
                done += send(box)[0] in (200, 201)
            return done

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            done = sum(pool.map(lambda _: client(), range(CLIENTS)))
        rates[kind] = done / MEASURE
    figure(
        f"cluster: {label}: {rates['orders']:.0f} orders/s,"
        f" {rates['movie reads']:.0f} movie reads/s ({CLIENTS} clients, {MEASURE} s each)"
    )
    return rates


def memory(label):
    """Each running host's memory: the PSS of every process in its PID
    namespace (shared pages split between those sharing them)."""
    namespaces = {}
    for pid_file in sorted(STATE.glob("*/nspawn.pid")):
        nspawn = pid_file.read_text().strip()
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
        namespaces[os.readlink(f"/proc/{children[0]}/ns/pid")] = pid_file.parent.name
    used = dict.fromkeys(namespaces.values(), 0)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            host = namespaces.get(os.readlink(proc / "ns" / "pid"))
            if host is not None:
                rollup = (proc / "smaps_rollup").read_text()
                used[host] += next(
                    int(line.split()[1])
                    for line in rollup.splitlines()
                    if line.startswith("Pss:")
                )
        except (OSError, StopIteration):
            continue  # gone meanwhile, or a kernel thread
    figure(
        f"cluster: {label}: memory (PSS) MiB "
        + ", ".join(f"{k} {v // 1024}" for k, v in sorted(used.items()))
    )


def queue_members():
    """billing_queue's type and its members' host names, as a node says."""
    info = queue_info(items=("type", "members"))
    assert info, "no RabbitMQ node answers"
    return info["type"], sorted(re.findall(r"rabbit@([\w-]+)", info["members"]))


def replicas_online():
    """The quorum queue's members that take part in its Raft group."""
    for name in BILLING_VMS:
        cmd = (
            "timeout",
            "15",
            "rabbitmq-queues",
            "-q",
            "quorum_status",
            "billing_queue",
        )
        proc = hosts("exec", name, "--", *cmd, "--formatter", "json", timeout=30)
        if proc.returncode == 0:
            break
    else:
        return []
    states = json.loads(proc.stdout)
    return sorted(
        s["Node Name"].removeprefix("rabbit@")
        for s in states
        if s.get("Raft State") in ("leader", "follower")
    )


def all_serving():
    """Three replicas online, three consumers and both inventories on /health."""
    status, body = request("GET", "/health")
    return (
        status == 200
        and body["status"] == "ok"
        and body["queue"]["consumers"] == 3
        and set(body["inventories"].values()) == {"ok"}
        and len(body["inventories"]) == 2
        and replicas_online() == sorted(BILLING_VMS)
    )


@pytest.fixture(scope="module")
def cluster(three_hosts):
    """The three hosts grown into the cluster, with orders queued meanwhile."""
    helpers.wait_for(gateway_healthy, 120, interval=0.5, what="health 200")
    throughput("three VMs (one inventory, one consumer)")
    memory("three VMs")
    on(BILLING_VM, "pm2", "stop", "billing_app")
    first = 8_000_000 + int(time.time()) % 1000 * 1000
    queued = range(first, first + QUEUED)
    for user in queued:
        assert request("POST", "/api/billing", order_body(user))[0] == 200
    start = time.monotonic()
    up = hosts("up", timeout=1200, env={"CLUSTER": "1"})
    figure(
        f"cluster: CLUSTER=1 hosts.sh up on the three hosts: {time.monotonic() - start:.0f} s"
    )
    for line in up.stdout.splitlines():
        if line.startswith("==> timing: "):
            figure("  " + line.removeprefix("==> timing: "))
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    helpers.wait_for(all_serving, 120, interval=1, what="the cluster serving")
    log = Path(
        "/var/lib/movie-shop/hosts", BILLING_VMS[-1], "provision.log"
    ).read_text()
    assert "drained in" in log, "the classic queue was not migrated"
    assert queue_members() == ("quorum", sorted(BILLING_VMS))
    stored = orders_of(queued)
    assert stored == dict.fromkeys(queued, 1), stored  # each queued order once
    yield
    heal_everything()


def test_the_cluster_serves_and_holds_what_was_queued(cluster):
    throughput("cluster (two inventories, three consumers)")
    memory("cluster")
    # Each billing host's consumer stores orders: rows come from all three.
    (apps,) = psql(
        BILLING_VM,
        BILLING_DB,
        "SELECT count(DISTINCT client_addr) FROM pg_stat_activity"
        " WHERE usename = 'billing_user' AND client_addr IS NOT NULL",
    )
    assert int(apps[0]) == 3, apps


def test_cluster_ports_admit_only_the_other_nodes(cluster):
    """Erlang distribution (25672), epmd (4369) and billing_db (5432) on the
    billing hosts: reachable from the other nodes, not from gateway-vm, not
    from the reviewer's address."""
    for name in BILLING_VMS:
        peer = next(n for n in BILLING_VMS if n != name)
        for port in [4369, 25672] + ([5432] if name == BILLING_VM else []):
            address = ALL_IP_OF[name]
            probe = f"import socket; socket.create_connection(('{address}', {port}), 3)"
            reached = hosts("exec", peer, "--", "python3", "-c", probe)
            assert reached.returncode == 0, f"{peer} cannot reach {name}:{port}"
            refused = hosts("exec", GATEWAY_VM, "--", "python3", "-c", probe)
            assert refused.returncode != 0, f"{GATEWAY_VM} reaches {name}:{port}"
            with pytest.raises(OSError):
                socket.create_connection(
                    (address, port), 3, source_address=(BRIDGE_IP, 0)
                )


@pytest.mark.parametrize("index", range(len(FAULTS)), ids=[f.name for f in FAULTS])
def test_cluster_fault(cluster, index):
    """run_fault's checks, then: nothing dead-lettered, three replicas online
    and both inventories serving again."""
    helpers.wait_for(all_serving, 120, interval=1, what="the cluster serving first")
    run_fault(FAULTS[index], 100 + index)
    helpers.wait_for(all_serving, 120, interval=1, what="the cluster serving again")
    dead = queue_info("billing_queue.dead")
    assert dead == {"messages": "0"}, dead
