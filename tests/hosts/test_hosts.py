"""The Vagrant deployment on three real Debian 12 hosts (scripts/hosts.sh).

scripts/hosts.sh boots gateway-vm, inventory-vm and billing-vm as systemd
hosts in network namespaces of their own, on a bridge that carries the .env
addresses, and provisions them with the Vagrantfile's scripts and environment.
This module brings them up from nothing (the cached base may be reused), replays
the audit from the bridge's address (the reviewer's computer) and inside the
VMs, checks the network, reboots two hosts, provisions all three again, and
takes everything down. It never touches this machine's PostgreSQL or RabbitMQ.

The figures (phase timings, listening sockets, each audit step's result) are
printed at the end of the run, in a "three hosts" section.
"""

import json
import re
import socket
import subprocess
import threading
import time

import helpers
from helpers_hosts import APP_OF
from helpers_hosts import BILLING_DB
from helpers_hosts import BILLING_IP
from helpers_hosts import BILLING_VM
from helpers_hosts import BRIDGE_IP
from helpers_hosts import GATEWAY_IP
from helpers_hosts import GATEWAY_VM
from helpers_hosts import INVENTORY_IP
from helpers_hosts import INVENTORY_VM
from helpers_hosts import IP_OF
from helpers_hosts import MOVIES_DB
from helpers_hosts import ROOT
from helpers_hosts import VM_ENV
from helpers_hosts import figure
from helpers_hosts import gateway_healthy
from helpers_hosts import hosts
from helpers_hosts import on
from helpers_hosts import order
from helpers_hosts import orders_of
from helpers_hosts import pm2_apps
from helpers_hosts import psql
from helpers_hosts import replay_audit
from helpers_hosts import request

# What may listen on each host: (address, port, process). A new listener, or a
# service on another address, fails the test.
LISTENERS = {
    GATEWAY_VM: {(GATEWAY_IP, VM_ENV["GATEWAY_PORT"], "python")},
    INVENTORY_VM: {
        (INVENTORY_IP, VM_ENV["INVENTORY_PORT"], "python"),
        ("127.0.0.1", "5432", "postgres"),
        ("[::1]", "5432", "postgres"),
    },
    BILLING_VM: {
        ("127.0.0.1", "5432", "postgres"),
        ("[::1]", "5432", "postgres"),
        # RabbitMQ: AMQP on billing-vm's address (for gateway-vm) and loopback;
        # the Erlang distribution port and epmd (socket-activated by systemd)
        # on loopback only, for rabbitmqctl, which finds the node at the host
        # name's address: 127.0.1.1, as Debian (and Vagrant) map it.
        (BILLING_IP, VM_ENV["RABBITMQ_PORT"], "beam.smp"),
        ("127.0.0.1", VM_ENV["RABBITMQ_PORT"], "beam.smp"),
        ("127.0.1.1", "25672", "beam.smp"),
        ("127.0.0.1", "4369", "epmd"),
        ("127.0.1.1", "4369", "epmd"),
    },
}
# Each service's own system user (primary group SERVICE_GROUP), per host.
SERVICE_USER = {
    GATEWAY_VM: "movie-gateway",
    INVENTORY_VM: "movie-inventory",
    BILLING_VM: "movie-billing",
}
SERVICE_GROUP = "movie-shop"

# --- Helpers ---


def listeners(name):
    """{(address, port, process)} of the TCP sockets listening on host name."""
    found = set()
    for line in on(name, "ss", "-Hltnp").splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        processes = re.findall(r'\("([^"]+)",pid=', line) or ["?"]
        # systemd also holds the sockets it activates a service with (epmd's).
        for process in [p for p in processes if p != "systemd"] or processes:
            found.add((address, port, process))
    return found


def connects(name, address, port):
    """Whether a TCP connection from host name to address:port succeeds."""
    proc = hosts(
        "exec",
        name,
        "--",
        "timeout",
        "5",
        "bash",
        "-c",
        f"exec 3<>/dev/tcp/{address}/{port}",
    )
    return proc.returncode == 0


class Poster(threading.Thread):
    """Posts one order every 0.2 s, each for a new user, until stopped."""

    def __init__(self, first_user):
        super().__init__(daemon=True)
        self.next_user, self.results, self.stopping = first_user, [], threading.Event()

    def run(self):
        while not self.stopping.is_set():
            user, self.next_user = self.next_user, self.next_user + 1
            self.results.append((user, order(user)))
            time.sleep(0.2)

    def stop(self):
        self.stopping.set()
        self.join(30)
        return self.results


# --- One environment for Vagrant and the hosts ---

# Loads the Vagrantfile with a stand-in for Vagrant.configure and prints the
# environment its shell provisioner gets.
VAGRANT_PROVISION_ENV = """
require "json"
module Vagrant
  def self.configure(*); end
end
load "Vagrantfile"
puts JSON.generate(PROVISION_ENV)
"""


def test_hosts_get_the_environment_vagrant_passes():
    """scripts/hosts.sh provisions with exactly the Vagrantfile's PROVISION_ENV."""
    ruby = subprocess.run(
        ["ruby", "-e", VAGRANT_PROVISION_ENV],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ruby.returncode == 0, ruby.stderr
    vagrant = json.loads(ruby.stdout)
    proc = hosts("env")
    assert proc.returncode == 0, proc.stderr
    ours = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert ours == vagrant
    assert ours["REPO_DIR"] == "/vagrant"


# --- The audit, from the reviewer's computer and inside the VMs ---


def test_audit_across_three_hosts(three_hosts):
    """The audit's steps 6-16 and 8 (newman), against 192.168.56.10 and on the VMs."""
    replay_audit(lambda text: figure(f"audit: {text}"))


def test_network_as_designed(three_hosts):
    """Each service where the design puts it, and nothing else listening."""
    out = on(
        GATEWAY_VM,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://{INVENTORY_IP}:{VM_ENV['INVENTORY_PORT']}/api/movies",
    )
    assert out == "200"
    figure(
        f"network: gateway-vm -> {INVENTORY_IP}:{VM_ENV['INVENTORY_PORT']} answers 200"
    )

    # The project's RabbitMQ user from .env, read on the VM (no password on a command line).
    logins = json.loads(
        on(
            GATEWAY_VM,
            f"{VM_ENV['VENV_ROOT']}/gateway/bin/python",
            "-",
            stdin=AMQP_LOGINS,
        )
    )
    assert logins["project"] == "ok", logins
    assert "ACCESS_REFUSED" in logins["guest"], logins
    figure(f"network: RabbitMQ from gateway-vm: guest -> {logins['guest'][:60]}...")
    figure(
        f"network: RabbitMQ from gateway-vm: {VM_ENV['RABBITMQ_GATEWAY_USER']} -> ok"
    )

    for client, address in (
        (GATEWAY_VM, INVENTORY_IP),
        (GATEWAY_VM, BILLING_IP),
        (BILLING_VM, INVENTORY_IP),
        (INVENTORY_VM, BILLING_IP),
    ):
        assert not connects(client, address, 5432), f"{client} reaches {address}:5432"
    assert connects(GATEWAY_VM, BILLING_IP, VM_ENV["RABBITMQ_PORT"])
    figure("network: PostgreSQL :5432 refused from the other hosts")

    # A service of this machine listening on every address is out of the hosts' reach.
    with socket.create_server(("0.0.0.0", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection((BRIDGE_IP, port), 3).close()
        assert not connects(GATEWAY_VM, BRIDGE_IP, port)
    figure(
        f"network: a listener of this machine on 0.0.0.0 is not reachable at {BRIDGE_IP}"
    )

    for name, allowed in LISTENERS.items():
        found = listeners(name)
        assert found == allowed, (
            f"{name}: unexpected {found - allowed}, missing {allowed - found}"
        )
        shown = ", ".join(f"{a}:{p} {c}" for a, p, c in sorted(found))
        figure(f"listening on {name}: {shown}")


# Who may open a TCP connection to what, beyond loopback: (from, to, port).
# Everything else is refused (a reset, not a silence), checked both ways between
# every pair of hosts and from the reviewer's computer (the bridge's address).
REVIEWER = "reviewer"
PROBED_PORTS = sorted(
    {
        "22",
        VM_ENV["GATEWAY_PORT"],
        VM_ENV["INVENTORY_PORT"],
        VM_ENV["RABBITMQ_PORT"],
        "5432",
        "4369",
        "25672",
    },
    key=int,
)
REACHABLE = {
    (client, GATEWAY_VM, VM_ENV["GATEWAY_PORT"])
    for client in (REVIEWER, GATEWAY_VM, INVENTORY_VM, BILLING_VM)
} | {
    (GATEWAY_VM, INVENTORY_VM, VM_ENV["INVENTORY_PORT"]),
    (GATEWAY_VM, BILLING_VM, VM_ENV["RABBITMQ_PORT"]),
    # A host reaches its own address over loopback.
    (INVENTORY_VM, INVENTORY_VM, VM_ENV["INVENTORY_PORT"]),
    (BILLING_VM, BILLING_VM, VM_ENV["RABBITMQ_PORT"]),
}

PROBE = """
for target in "$@"; do
  for port in $PORTS; do
    timeout 3 bash -c "exec 3<>/dev/tcp/$target/$port" 2>/dev/null
    case $? in
      0) echo "$target $port open" ;;
      124) echo "$target $port silent" ;;
      *) echo "$target $port refused" ;;
    esac
  done
done
"""


def reviewer_probe(address, port):
    """open, refused or silent: a TCP connection from the bridge's address."""
    try:
        socket.create_connection(
            (address, int(port)), timeout=3, source_address=(BRIDGE_IP, 0)
        ).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "silent"


def reachability():
    """{(from, to, port): open / refused / silent} for every client and host."""
    found = {}
    for target, address in IP_OF.items():
        for port in PROBED_PORTS:
            found[(REVIEWER, target, port)] = reviewer_probe(address, port)
    for client in IP_OF:
        out = on(
            client,
            "env",
            f"PORTS={' '.join(PROBED_PORTS)}",
            "bash",
            "-c",
            PROBE,
            "probe",
            *IP_OF.values(),
            timeout=300,
        )
        by_address = {address: name for name, address in IP_OF.items()}
        for line in out.splitlines():
            address, port, state = line.split()
            found[(client, by_address[address], port)] = state
    return found


def test_firewall_admits_only_what_each_role_needs(three_hosts):
    """From the reviewer's address only the gateway's port answers; inventory's
    port and AMQP answer gateway-vm only; everything else is refused at once."""
    found = reachability()
    opened = {key for key, state in found.items() if state == "open"}
    assert opened == REACHABLE, (
        f"open beyond the allow-list: {opened - REACHABLE},"
        f" closed in it: {REACHABLE - opened}"
    )
    silent = {key for key, state in found.items() if state == "silent"}
    assert not silent, f"dropped instead of refused: {silent}"
    for name in IP_OF:
        rules = on(name, "nft", "list", "table", "inet", "movie_shop")
        assert "policy drop" in rules, rules
        assert on(name, "systemctl", "is-enabled", "movie-shop-firewall").strip() == (
            "enabled"
        )
    reviewer = sorted(f"{t}:{p}" for (c, t, p) in opened if c == REVIEWER)
    figure(
        f"firewall: {len(found)} (from, to, port) probes; from {BRIDGE_IP} open:"
        f" {', '.join(reviewer)}; {len(opened)} open in all, as allowed"
    )


def assert_firewall_loaded(name, closed_port):
    """After a reboot: the firewall is back, closed_port refused to the reviewer."""
    assert on(name, "systemctl", "is-active", "movie-shop-firewall").strip() == (
        "active"
    )
    assert reviewer_probe(IP_OF[name], closed_port) == "refused"


AMQP_LOGINS = """
import json

import pika
from dotenv import dotenv_values

env = dotenv_values("/vagrant/.env")


def login(user, password):
    params = pika.ConnectionParameters(
        env["RABBITMQ_HOST"],
        int(env["RABBITMQ_PORT"]),
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=5,
    )
    try:
        pika.BlockingConnection(params).close()
        return "ok"
    except pika.exceptions.AMQPError as exc:
        return f"{type(exc).__name__}: {exc}"


print(json.dumps({
    "guest": login("guest", "guest"),
    "project": login(env["RABBITMQ_GATEWAY_USER"], env["RABBITMQ_GATEWAY_PASSWORD"]),
}))
"""


# --- Least privilege ---


def as_user(name, user, *cmd):
    """Run cmd inside host name as user (no shell, no supplementary groups)."""
    return hosts("exec", name, "--", "runuser", "-u", user, "--", *cmd)


def test_services_run_as_their_own_users(three_hosts):
    """Each app under its own system user (no shell, no sudo), shown by sudo pm2 list;
    it can write nothing in the repository copy or its virtualenv."""
    venv = VM_ENV["VENV_ROOT"]
    for name, app in APP_OF.items():
        user = SERVICE_USER[name]
        status, pid, _ = pm2_apps(name)[app]
        assert status == "online"
        assert on(name, "ps", "-o", "user:32=", "-p", str(pid)).strip() == user
        _, _, uid, _, _, _, shell = on(name, "getent", "passwd", user).split(":")
        assert shell.strip() == "/usr/sbin/nologin" and int(uid) < 1000, (uid, shell)
        assert on(name, "id", "-gn", user).strip() == SERVICE_GROUP
        assert "sudo" not in on(name, "id", "-nG", user).split()
        sudo = hosts("exec", name, "--", "sudo", "-l", "-U", user)
        assert "not allowed to run sudo" in sudo.stdout, sudo.stdout + sudo.stderr
        found = as_user(name, user, "find", "/vagrant", venv, "-writable", "-print")
        assert found.returncode == 0 and found.stdout == "", found.stdout[:500]
        figure(
            f"privileges: {name}: {app} pid {pid} runs as {user}, shell {shell.strip()}"
        )


def test_env_and_logs_readable_by_root_and_the_service_only(three_hosts):
    """.env and the PM2 logs: root's, group SERVICE_GROUP, mode 0640; logrotate."""
    logs = VM_ENV["LOG_DIR"]
    for name, app in APP_OF.items():
        user = SERVICE_USER[name]
        files = ["/vagrant/.env", f"{logs}/{app}.out.log", f"{logs}/{app}.err.log"]
        modes = on(name, "stat", "-c", "%n %a %U %G", *files).splitlines()
        assert modes == [f"{f} 640 root {SERVICE_GROUP}" for f in files], modes
        assert as_user(name, user, "cat", *files).returncode == 0
        assert as_user(name, "nobody", "cat", files[0]).returncode != 0
        assert as_user(name, "nobody", "cat", files[1]).returncode != 0
        assert (
            on(name, "systemctl", "is-enabled", "logrotate.timer").strip() == "enabled"
        )
    figure(f"privileges: .env and {logs}/*.log: 640 root {SERVICE_GROUP} on each host")

    # A forced rotation keeps the mode, and PM2 keeps writing to the same file
    # (billing's INFO lines go to stdout; an empty log is not rotated).
    on(BILLING_VM, "logrotate", "--force", "/etc/logrotate.d/movie-shop")
    rotated = on(BILLING_VM, "stat", "-c", "%a %U %G", f"{logs}/billing_app.out.log.1")
    assert rotated.split() == ["640", "root", SERVICE_GROUP], rotated
    on(BILLING_VM, "sudo", "pm2", "restart", "billing_app")
    helpers.wait_for(
        lambda: (
            on(BILLING_VM, "stat", "-c", "%s", f"{logs}/billing_app.out.log").strip()
            != "0"
        ),
        30,
        interval=0.5,
        what="billing_app to write to its log again after the rotation",
    )
    rule = on(BILLING_VM, "cat", "/etc/logrotate.d/movie-shop")
    figure(f"privileges: logrotate: {' '.join(rule.split())}")


def test_rabbitmq_users_can_do_only_their_job(three_hosts):
    """gateway: passive declares and publish only; billing: consume only; no guest."""
    results = json.loads(
        on(
            BILLING_VM,
            f"{VM_ENV['VENV_ROOT']}/billing/bin/python",
            "-",
            stdin=AMQP_RIGHTS,
        )
    )
    expected_ok = {
        "gateway passive declare",
        "gateway publish to the queue",
        "billing passive declare",
        "billing basic_get",
    }
    for action, result in results.items():
        if action in expected_ok:
            assert result == "ok", (action, result)
        elif action == "guest from loopback":
            assert "ProbableAuthenticationError" in result or "ACCESS_REFUSED" in result
        else:
            # Logged in, then refused that one action (not a refused login).
            assert result.startswith("ChannelClosedByBroker: (403"), (action, result)
        figure(f"rabbitmq on billing-vm: {action} -> {result[:90]}")
    assert set(results) >= expected_ok | {"gateway basic_get", "gateway purge"}
    users = on(BILLING_VM, "rabbitmqctl", "-q", "list_users").split()
    assert "guest" not in users, users
    # A message billing cannot store still reaches the dead-letter queue.
    helpers.wait_for(
        lambda: dead_letters() >= 1,
        30,
        interval=0.5,
        what="billing to dead-letter the message it refused",
    )
    for client, port in ((GATEWAY_VM, "25672"), (GATEWAY_VM, "4369")):
        assert not connects(client, BILLING_IP, port), f"{client} reaches {port}"
    assert connects(BILLING_VM, "127.0.0.1", VM_ENV["RABBITMQ_PORT"])
    assert not connects(BILLING_VM, "127.0.1.1", VM_ENV["RABBITMQ_PORT"])
    figure("rabbitmq: 25672 and 4369 refused from gateway-vm; 5672 not on 127.0.1.1")


def dead_letters():
    """Messages in the dead-letter queue on billing-vm."""
    out = on(BILLING_VM, "rabbitmqctl", "-q", "list_queues", "name", "messages")
    counts = dict(line.split() for line in out.splitlines() if line.strip())
    return int(counts.get(f"{VM_ENV['RABBITMQ_QUEUE']}.dead", 0))


AMQP_RIGHTS = """
import json

import pika
from dotenv import dotenv_values

env = dotenv_values("/vagrant/.env")
queue = env["RABBITMQ_QUEUE"]
results = {}


def attempt(what, user, password, action, host="127.0.0.1"):
    params = pika.ConnectionParameters(
        host,
        int(env["RABBITMQ_PORT"]),
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=5,
    )
    try:
        with pika.BlockingConnection(params) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            action(channel)
        results[what] = "ok"
    except pika.exceptions.AMQPError as exc:
        results[what] = f"{type(exc).__name__}: {exc}"


gateway = env["RABBITMQ_GATEWAY_USER"], env["RABBITMQ_GATEWAY_PASSWORD"]
billing = env["RABBITMQ_BILLING_USER"], env["RABBITMQ_BILLING_PASSWORD"]
publish = lambda key: lambda ch: ch.basic_publish("", key, b"not json", mandatory=True)
attempt("gateway passive declare", *gateway,
        lambda ch: ch.queue_declare(queue, passive=True))
attempt("gateway publish to the queue", *gateway, publish(queue), env["RABBITMQ_HOST"])
attempt("gateway basic_get", *gateway, lambda ch: ch.basic_get(queue))
attempt("gateway consume", *gateway,
        lambda ch: ch.basic_consume(queue, lambda *a: None))
attempt("gateway purge", *gateway, lambda ch: ch.queue_purge(queue))
attempt("gateway delete", *gateway, lambda ch: ch.queue_delete(queue))
attempt("gateway delete the dead-letter queue", *gateway,
        lambda ch: ch.queue_delete(f"{queue}.dead"))
attempt("gateway declare another queue", *gateway,
        lambda ch: ch.queue_declare("other_queue"))
attempt("billing passive declare", *billing,
        lambda ch: ch.queue_declare(queue, passive=True))
attempt("billing basic_get", *billing, lambda ch: ch.basic_get(queue))
attempt("billing publish to another queue", *billing, publish(f"{queue}.dead"))
attempt("billing publish to the queue", *billing, publish(queue))
attempt("billing delete", *billing, lambda ch: ch.queue_delete(queue))
attempt("billing read the dead letters", *billing,
        lambda ch: ch.basic_get(f"{queue}.dead"))
attempt("guest from loopback", "guest", "guest",
        lambda ch: ch.queue_declare(queue, passive=True))
print(json.dumps(results))
"""


def test_database_roles_own_only_their_database(three_hosts):
    """Each service's role: its own database only, no superuser, no CREATEDB/ROLE."""
    for name, role, db in (
        (INVENTORY_VM, VM_ENV["INVENTORY_DB_USER"], MOVIES_DB),
        (BILLING_VM, VM_ENV["BILLING_DB_USER"], BILLING_DB),
    ):
        attributes = psql(
            name,
            "postgres",
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
            f" FROM pg_roles WHERE rolname = '{role}'",
        )
        assert attributes == [["f"] * 5], attributes
        owned = psql(
            name,
            "postgres",
            "SELECT datname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba"
            f" WHERE r.rolname = '{role}'",
        )
        assert owned == [[db]], owned
        figure(
            f"postgresql on {name}: {role} owns {db} only; no superuser/createdb/createrole"
        )


# --- Reboots ---


def test_billing_vm_reboot_keeps_every_accepted_order(three_hosts):
    """Orders queued while billing_app is stopped survive a reboot of billing-vm;
    during the reboot every order is 200 or 503, and each 200 is stored once."""
    gateway_before = pm2_apps(GATEWAY_VM)["api_gateway"]
    on(BILLING_VM, "sudo", "pm2", "stop", "billing_app")
    queued = list(range(1000, 1010))
    assert [order(user) for user in queued] == [200] * len(queued)
    time.sleep(2)
    assert orders_of(queued) == {}

    poster = Poster(2000)
    poster.start()
    start = time.monotonic()
    try:
        reboot = hosts("reboot", BILLING_VM, timeout=180)
        assert reboot.returncode == 0, reboot.stdout + reboot.stderr
        booted = time.monotonic() - start
        helpers.wait_for(
            lambda: pm2_apps(BILLING_VM).get("billing_app", ("",))[0] == "online",
            60,
            interval=0.5,
            what="billing_app online after the reboot",
        )
        app_back = time.monotonic() - start
        helpers.wait_for(gateway_healthy, 60, interval=0.5, what="health 200")
        healthy = time.monotonic() - start
        time.sleep(2)
    finally:
        results = poster.stop()
    assert on(BILLING_VM, "systemctl", "is-active", "pm2-root").strip() == "active"
    assert_firewall_loaded(BILLING_VM, VM_ENV["RABBITMQ_PORT"])

    statuses = [status for _, status in results]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "RabbitMQ never looked down during the reboot"
    accepted = [user for user, status in results if status == 200]
    expected = {user: 1 for user in queued + accepted}
    helpers.wait_for(
        lambda: orders_of(expected) == expected,
        60,
        interval=0.5,
        what="every accepted order stored",
    )
    assert pm2_apps(GATEWAY_VM)["api_gateway"] == gateway_before
    figure(
        f"reboot billing-vm: booted {booted:.1f} s, billing_app online {app_back:.1f} s,"
        f" health 200 {healthy:.1f} s; queued before={len(queued)} stored after=all;"
        f" during: posted={len(statuses)} ok={statuses.count(200)}"
        f" unavailable={statuses.count(503)} stored_ok=all; api_gateway not restarted"
    )


def test_inventory_vm_reboot(three_hosts):
    """inventory-vm comes back by itself with its data, inventory_app running
    even though it was stopped before the reboot; the gateway recovers."""
    gateway_before = pm2_apps(GATEWAY_VM)["api_gateway"]
    status, movie = request(
        "POST", "/api/movies/", {"title": "Before the reboot", "description": "kept"}
    )
    assert status == 201
    path = f"/api/movies/{movie['id']}"
    on(INVENTORY_VM, "sudo", "pm2", "stop", "inventory_app")
    assert request("GET", path)[0] == 502
    seen = []
    stopping = threading.Event()

    def poll():
        while not stopping.is_set():
            try:
                seen.append(request("GET", path, timeout=20)[0])
            except OSError:
                seen.append(None)
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.monotonic()
    try:
        reboot = hosts("reboot", INVENTORY_VM, timeout=180)
        assert reboot.returncode == 0, reboot.stdout + reboot.stderr
        booted = time.monotonic() - start
        helpers.wait_for(
            lambda: request("GET", path) == (200, movie),
            60,
            interval=0.5,
            what="the movie again",
        )
        back = time.monotonic() - start
        helpers.wait_for(gateway_healthy, 60, interval=0.5, what="health 200")
    finally:
        stopping.set()
        poller.join(30)
    assert set(seen) <= {200, 502, 503, 504}, seen
    assert any(status != 200 for status in seen), "inventory never looked down"
    assert pm2_apps(INVENTORY_VM)["inventory_app"][0] == "online"
    assert on(INVENTORY_VM, "systemctl", "is-active", "pm2-root").strip() == "active"
    assert_firewall_loaded(INVENTORY_VM, VM_ENV["INVENTORY_PORT"])
    assert pm2_apps(GATEWAY_VM)["api_gateway"] == gateway_before
    codes = {code: seen.count(code) for code in sorted(set(seen), key=str)}
    figure(
        f"reboot inventory-vm: booted {booted:.1f} s, movie served again {back:.1f} s;"
        f" answers during it {codes}; api_gateway not restarted"
    )


# --- Provisioning again ---

FIREWALL = (
    " /etc/movie-shop/firewall.nft /etc/systemd/system/movie-shop-firewall.service;"
    " nft list ruleset"
)
RESTART = {
    unit: f" /etc/systemd/system/{unit}.service.d/movie-shop.conf"
    for unit in ("postgresql@", "rabbitmq-server")
}
MANAGED_FILES = {
    INVENTORY_VM: "cat /etc/postgresql/*/main/pg_hba.conf /etc/postgresql/*/main/conf.d/*"
    " /etc/systemd/system/pm2-root.service" + RESTART["postgresql@"] + FIREWALL,
    BILLING_VM: "cat /etc/postgresql/*/main/pg_hba.conf /etc/postgresql/*/main/conf.d/*"
    " /etc/rabbitmq/rabbitmq.conf /etc/systemd/system/pm2-root.service"
    + RESTART["postgresql@"]
    + RESTART["rabbitmq-server"]
    + FIREWALL,
    GATEWAY_VM: "cat /etc/systemd/system/pm2-root.service" + FIREWALL,
}


def test_provisioning_again_changes_nothing(three_hosts):
    """vagrant provision's stand-in: same data, same configuration, apps online."""
    counts = "SELECT count(*), coalesce(max(id), 0) FROM "
    movies = psql(INVENTORY_VM, MOVIES_DB, counts + "movies")
    orders = psql(BILLING_VM, BILLING_DB, counts + "orders")
    files = {name: on(name, "bash", "-c", cmd) for name, cmd in MANAGED_FILES.items()}
    start = time.monotonic()
    proc = hosts("provision", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    took = time.monotonic() - start
    assert psql(INVENTORY_VM, MOVIES_DB, counts + "movies") == movies
    assert psql(BILLING_VM, BILLING_DB, counts + "orders") == orders
    for name, cmd in MANAGED_FILES.items():
        assert on(name, "bash", "-c", cmd) == files[name], (
            f"{name}: configuration changed"
        )
    for name, app in APP_OF.items():
        assert pm2_apps(name)[app][0] == "online"
    helpers.wait_for(gateway_healthy, 60, interval=0.5, what="health 200")
    figure(
        f"provision again: {took:.0f} s; movies {movies[0]} and orders {orders[0]}"
        " (count, max id) unchanged; configuration files unchanged; apps online"
    )


# --- Purge, then provision again (last: it drops billing-vm's data) ---

# What down.sh --purge must leave on billing-vm, one shell test per line.
PURGED = [
    "! systemctl cat pm2-root",
    "! test -e /etc/systemd/system/pm2-root.service",
    "! test -e /etc/systemd/system/pm2-root.service.d",
    "! test -e /root/.pm2",
    "! pgrep -u movie-billing",
    f"! test -e {VM_ENV['VENV_ROOT']}",
    f"! test -e {VM_ENV['LOG_DIR']}",
    "! test -e /etc/logrotate.d/movie-shop",
    "! test -e /etc/systemd/system/logrotate.timer.d/movie-shop.conf",
    "! test -e /etc/systemd/system/postgresql@.service.d/movie-shop.conf",
    "! test -e /etc/systemd/system/rabbitmq-server.service.d/movie-shop.conf",
    "! grep -q 'Managed by scripts' /etc/rabbitmq/rabbitmq.conf",
    "! grep -q movie-shop /etc/postgresql/*/main/pg_hba.conf",
    "! ls /etc/postgresql/*/main/conf.d/50-movie-shop.conf",
]


def test_purge_on_a_host_then_provision_restores_it(three_hosts):
    """down.sh --purge on billing-vm, under systemd, removes the pm2-root unit,
    roles, databases, broker users, queues, venvs and logs; provisioning again
    brings it all back and orders flow."""
    assert on(BILLING_VM, "systemctl", "is-enabled", "pm2-root").strip() == "enabled"
    start = time.monotonic()
    purge = hosts(
        "exec", BILLING_VM, "--", "/vagrant/scripts/down.sh", "--purge", timeout=300
    )
    assert purge.returncode == 0, purge.stdout + purge.stderr
    took = time.monotonic() - start
    assert "removing the pm2-root boot service" in purge.stdout, purge.stdout
    for check in PURGED:
        proc = hosts("exec", BILLING_VM, "--", "bash", "-c", check)
        assert proc.returncode == 0, f"left after the purge: {check}\n{proc.stdout}"
    roles = psql(BILLING_VM, "postgres", "SELECT rolname FROM pg_roles")
    assert [VM_ENV["BILLING_DB_USER"]] not in roles
    dbs = psql(BILLING_VM, "postgres", "SELECT datname FROM pg_database")
    assert [BILLING_DB] not in dbs
    users = on(BILLING_VM, "rabbitmqctl", "-q", "list_users").split()
    assert VM_ENV["RABBITMQ_GATEWAY_USER"] not in users
    assert VM_ENV["RABBITMQ_BILLING_USER"] not in users
    queues = on(BILLING_VM, "rabbitmqctl", "-q", "list_queues", "name").split()
    assert VM_ENV["RABBITMQ_QUEUE"] not in queues

    proc = hosts("provision", BILLING_VM, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert on(BILLING_VM, "systemctl", "is-enabled", "pm2-root").strip() == "enabled"
    assert pm2_apps(BILLING_VM)["billing_app"][0] == "online"
    helpers.wait_for(
        gateway_healthy, 90, what="health 200 after provisioning billing-vm again"
    )
    assert order(3000) == 200
    helpers.wait_for(
        lambda: orders_of([3000]) == {3000: 1}, 60, what="the new order stored"
    )
    figure(
        f"purge billing-vm: {took:.0f} s, pm2-root, roles, databases, broker users,"
        " venvs and logs gone; provision again: app online, order stored"
    )
