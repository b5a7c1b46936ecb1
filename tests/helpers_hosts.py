"""Test helpers for the three Debian hosts of scripts/hosts.sh: running
commands on them, calling the gateway from the reviewer's address, and the
figures printed in the "three hosts" section at the end of the run."""

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import helpers
import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ROOT / "scripts" / "hosts.sh"
# The VMs get .env and vm.env, exactly as the Vagrantfile reads them (the
# environment of this test does not change what they see).
VM_ENV = {**dotenv_values(ROOT / ".env"), **dotenv_values(ROOT / "vm.env")}
GATEWAY_VM, INVENTORY_VM, BILLING_VM = "gateway-vm", "inventory-vm", "billing-vm"
GATEWAY_IP = VM_ENV["GATEWAY_HOST"]
INVENTORY_IP = VM_ENV["INVENTORY_HOST"]
BILLING_IP = VM_ENV["BILLING_HOST"]
GATEWAY = f"http://{GATEWAY_IP}:{VM_ENV['GATEWAY_PORT']}"
# This machine on the hosts' bridge: the reviewer's computer.
BRIDGE_IP = GATEWAY_IP.rsplit(".", 1)[0] + ".1"
MOVIES_DB = VM_ENV["INVENTORY_DB_NAME"]
BILLING_DB = VM_ENV["BILLING_DB_NAME"]
APP_OF = {
    GATEWAY_VM: "api_gateway",
    INVENTORY_VM: "inventory_app",
    BILLING_VM: "billing_app",
}
IP_OF = {GATEWAY_VM: GATEWAY_IP, INVENTORY_VM: INVENTORY_IP, BILLING_VM: BILLING_IP}
# The cluster's hosts (CLUSTER=1): RabbitMQ nodes and billing consumers, a
# second inventory.
BILLING_VMS = (BILLING_VM, "billing-vm-2", "billing-vm-3")
INVENTORY_VM_2 = "inventory-vm-2"
CLUSTER_IP_OF = {
    "billing-vm-2": VM_ENV["BILLING_2_HOST"],
    "billing-vm-3": VM_ENV["BILLING_3_HOST"],
    INVENTORY_VM_2: VM_ENV["INVENTORY_2_HOST"],
}
NEWMAN = ROOT / "node_modules" / ".bin" / "newman"
COLLECTION = ROOT / "postman" / "movie-shop.postman_collection.json"
VAGRANT_ENV = ROOT / "postman" / "vagrant.postman_environment.json"
HEALTHY = {"status": "ok", "inventory": "ok", "rabbitmq": "ok"}


def gateway_healthy():
    """True when the gateway's /health is 200 with HEALTHY's verdicts."""
    status, body = request("GET", "/health")
    return status == 200 and {k: (body or {}).get(k) for k in HEALTHY} == HEALTHY


FIGURES = []
FAULT_ROWS = []  # one dict per fault, for the table (tests/hosts/test_hosts_faults.py)


def figure(text):
    """Keep one line for the summary printed at the end of the run."""
    FIGURES.append(text)


class Summary:
    """Prints the figures in pytest's terminal summary, so CI's log shows them."""

    def pytest_terminal_summary(self, terminalreporter):
        if FIGURES:
            terminalreporter.section("three hosts")
            for line in FIGURES:
                terminalreporter.write_line(line)
        if FAULT_ROWS:
            terminalreporter.section("faults between hosts")
            for line in table(FAULT_ROWS):
                terminalreporter.write_line(line)


def table(rows):
    """Lines of a Markdown table of dicts with the same keys."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows
    ]
    return lines


def hosts(*args, timeout=120, stdin=None, env=None):
    """Run scripts/hosts.sh (env: settings added to this environment); return
    the completed process."""
    return subprocess.run(
        [str(HOSTS), *args],
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def hosts_exec(name, cmd, timeout, stdin):
    """cmd as root inside host name, by scripts/hosts.sh exec."""
    return hosts("exec", name, "--", *cmd, timeout=timeout, stdin=stdin)


# How on() reaches a VM: hosts.sh exec, or what reached_by() sets (vagrant ssh).
REACH = [hosts_exec]


@contextmanager
def reached_by(run):
    """on(), psql() and the rest reach the VMs with run(name, cmd, timeout, stdin)."""
    REACH.append(run)
    try:
        yield
    finally:
        REACH.pop()


def on(name, *cmd, timeout=60, stdin=None, check=True):
    """Run cmd as root inside host name; return its standard output."""
    proc = REACH[-1](name, cmd, timeout, stdin)
    if check:
        assert proc.returncode == 0, f"{name}: {cmd} failed: {proc.stdout}{proc.stderr}"
    return proc.stdout


def succeeds(name, *cmd, timeout=60):
    """Whether cmd exits 0 inside host name."""
    return REACH[-1](name, cmd, timeout, None).returncode == 0


def psql(name, db, query):
    """Rows of query, run as the audit does: sudo -i -u postgres psql on the host."""
    out = on(
        name, "sudo", "-i", "-u", "postgres", "psql", "-X", "-At", "-d", db, "-c", query
    )
    return [line.split("|") for line in out.splitlines() if line]


def pm2_apps(name):
    """{app: (status, pid, restarts)} from root's PM2 on host name."""
    out = on(name, "sudo", "pm2", "jlist")
    listing = json.loads(out[out.index("[") :])
    return {
        app["name"]: (
            app["pm2_env"]["status"],
            app.get("pid"),
            app["pm2_env"]["restart_time"],
        )
        for app in listing
    }


def request(method, path, body=None, timeout=15):
    """Call the gateway from the bridge's address; return (status, JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(GATEWAY + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def rabbitmqctl(*args, nodes=BILLING_VMS):
    """rabbitmqctl -q args on the first of nodes whose node answers (a paused or
    cut-off node does not); the completed process of the last try otherwise."""
    proc = None
    for name in nodes:
        cmd = ("timeout", "15", "rabbitmqctl", "-q", *args)
        proc = hosts("exec", name, "--", *cmd, timeout=30)
        if proc.returncode == 0:
            break
    return proc


def queue_info(queue=VM_ENV["RABBITMQ_QUEUE"], items=("messages",)):
    """{item: value as text} of one queue (rabbit_amqqueue:info, asked of that
    queue alone: list_queues fails if any queue of the cluster is slow), from
    the first node that answers; {} if it has no such queue, None if no node
    answers."""
    keys = ", ".join(items)
    proc = rabbitmqctl(
        "eval",
        f'case rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)) of'
        f' {{ok, Q}} -> [io:format("info ~s ~p~n", [K, V])'
        f" || {{K, V}} <- rabbit_amqqueue:info(Q, [{keys}])], ok; _ -> ok end.",
    )
    if proc.returncode != 0:
        return None
    return dict(
        line.split(" ", 2)[1:]
        for line in proc.stdout.splitlines()
        if line.startswith("info ")
    )


def queue_depth(check=True):
    """Messages in billing_queue, ready or delivered and unacked, as a RabbitMQ
    node says (None if none answers and check is False)."""
    info = queue_info()
    if info is None and not check:
        return None
    assert info is not None, "no RabbitMQ node answers"
    return int(info.get("messages", 0))


def orders_of(user_ids):
    """{user_id: number of rows} in billing_db on billing-vm for these users."""
    ids = ",".join(str(int(u)) for u in user_ids)
    rows = psql(
        BILLING_VM,
        BILLING_DB,
        f"SELECT user_id, count(*) FROM orders WHERE user_id IN ({ids}) GROUP BY 1",
    )
    return {int(user): int(count) for user, count in rows}


def order(user_id, items="1", total="1"):
    """Post one order through the gateway; return the status (None when cut)."""
    body = {"user_id": str(user_id), "number_of_items": items, "total_amount": total}
    try:
        return request("POST", "/api/billing/", body, timeout=20)[0]
    except OSError:
        return None


def replay_audit(step, patience=1):
    """The audit's steps 6-16 and 8 (newman), against the gateway from the
    reviewer's address and on the VMs; step(text) records each result.
    patience multiplies the waits (VMs under emulation are slower)."""

    assert gateway_healthy(), request("GET", "/health")
    step(f"GET {GATEWAY}/health -> 200 {HEALTHY}")

    movie = {"title": "A new movie", "description": "Very short description"}
    status, created = request("POST", "/api/movies/", movie)
    assert status == 201, created
    step(f"POST /api/movies/ -> {status} id={created['id']}")
    status, listed = request("GET", "/api/movies/")
    assert status == 200 and created in listed
    step(f"GET /api/movies/ -> {status}, lists it")
    movie_path = f"/api/movies/{created['id']}/"
    status, renamed = request("PUT", movie_path, {"title": "Renamed"})
    assert (status, renamed["title"]) == (200, "Renamed")
    assert request("GET", movie_path) == (200, renamed)
    assert request("DELETE", movie_path)[0] == 200
    assert request("GET", movie_path)[0] == 404
    step(f"PUT, GET, DELETE, GET {movie_path} -> 200, 200, 200, 404")
    status, created = request("POST", "/api/movies/", movie)
    assert status == 201

    databases = on(INVENTORY_VM, "sudo", "-i", "-u", "postgres", "psql", "-X", "-l")
    assert MOVIES_DB in databases
    rows = psql(INVENTORY_VM, MOVIES_DB, "SELECT id, title, description FROM movies")
    assert rows == [[str(created["id"]), movie["title"], movie["description"]]]
    step(f"inventory-vm: psql -l lists {MOVIES_DB}; TABLE movies = {rows}")

    order_20 = {"user_id": "20", "number_of_items": "99", "total_amount": "250"}
    order_22 = {"user_id": "22", "number_of_items": "10", "total_amount": "50"}
    assert request("POST", "/api/billing/", order_20) == (
        200,
        {"message": "Message posted"},
    )
    helpers.wait_for(
        lambda: orders_of([20]) == {20: 1},
        30 * patience,
        interval=0.5,
        what="order 20 in billing_db",
    )
    step("POST /api/billing/ user 20 -> 200; stored on billing-vm")

    on(BILLING_VM, "sudo", "pm2", "stop", "billing_app")
    try:
        listing = on(BILLING_VM, "sudo", "pm2", "list", "--no-color")
        assert re.search(r"billing_app\s.*\sstopped\s", listing), listing
        step("billing-vm: sudo pm2 stop billing_app; pm2 list says stopped")
        assert request("POST", "/api/billing/", order_22) == (
            200,
            {"message": "Message posted"},
        )
        time.sleep(3 * patience)
        assert MOVIES_DB not in psql(
            BILLING_VM, "postgres", "SELECT datname FROM pg_database"
        )
        assert BILLING_DB in on(
            BILLING_VM, "sudo", "-i", "-u", "postgres", "psql", "-X", "-l"
        )
        stored = psql(
            BILLING_VM, BILLING_DB, "SELECT user_id, number_of_items FROM orders"
        )
        assert stored == [["20", "99"]]
        step(f"POST user 22 -> 200 while stopped; TABLE orders = {stored}")
    finally:
        on(BILLING_VM, "sudo", "pm2", "start", "billing_app")
    helpers.wait_for(
        lambda: orders_of([22]) == {22: 1},
        30 * patience,
        interval=0.5,
        what="order 22 stored after pm2 start",
    )
    step("billing-vm: sudo pm2 start billing_app; order 22 stored")

    for name, app in APP_OF.items():
        apps = pm2_apps(name)
        assert {a: s[0] for a, s in apps.items()} == {app: "online"}, apps
    step("sudo pm2 list: api_gateway, inventory_app, billing_app online, one per VM")

    if not NEWMAN.exists():
        pytest.fail(f"{NEWMAN} is missing: run `npm ci --ignore-scripts` in {ROOT}")
    proc = subprocess.run(
        [NEWMAN, "run", COLLECTION, "-e", VAGRANT_ENV, "--color", "off"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    totals = re.search(r"│\s+assertions\s+│\s+(\d+)\s+│\s+(\d+)\s+│", proc.stdout)
    assert totals, proc.stdout[-2000:]
    step(
        f"newman vagrant environment: assertions {totals.group(1)}, failed {totals.group(2)}"
    )
