"""Least privilege on the one-machine stack of ./scripts/up.sh.

The same rules as on the VMs (tests/hosts/test_hosts.py checks those): each PM2 app
runs as its own system user, which can write nothing in the repository; .env
and the logs are readable by root and the group movie-shop only; the two
RabbitMQ users can do only their job; the database roles own only their own
database. The machine's own broker users (guest) are left as they were.
Run against the running stack (sudo ./scripts/up.sh first).
"""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import helpers
import pika
import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[2]
ENV = {**dotenv_values(ROOT / ".env"), **os.environ}
LOG_DIR = ROOT / "logs"
SERVICE_GROUP = "movie-shop"
USER_OF = {
    "inventory_app": "movie-inventory",
    "billing_app": "movie-billing",
    "api_gateway": "movie-gateway",
}
START_HINT = "start the stack with: sudo ./scripts/up.sh"


def run(*cmd):
    """Run a command; return the completed process (text output)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def apps():
    """{app: pid} of the three PM2 apps, all online."""
    if shutil.which("pm2") is None:
        pytest.fail(f"pm2 is not installed; {START_HINT}")
    out = run("pm2", "jlist").stdout
    listing = json.loads(out[out.index("[") :])
    found = {
        a["name"]: a.get("pid") for a in listing if a["pm2_env"]["status"] == "online"
    }
    missing = set(USER_OF) - set(found)
    if missing:
        pytest.fail(f"not online under root's PM2: {sorted(missing)}; {START_HINT}")
    return found


def test_each_app_runs_as_its_own_user(apps):
    for app, pid in apps.items():
        if app not in USER_OF:
            continue
        user = USER_OF[app]
        assert run("ps", "-o", "user:32=", "-p", str(pid)).stdout.strip() == user
        entry = run("getent", "passwd", user).stdout.strip().split(":")
        assert entry[6] == "/usr/sbin/nologin" and int(entry[2]) < 1000, entry
        assert run("id", "-gn", user).stdout.strip() == SERVICE_GROUP
        assert "sudo" not in run("id", "-nG", user).stdout.split()
        # Nothing in the repository (code, venvs, logs) is writable by it.
        found = run("runuser", "-u", user, "--", "find", str(ROOT), "-writable")
        assert found.stdout == "", found.stdout[:500]


def test_env_and_logs_are_not_world_readable(apps):
    files = [ROOT / ".env"]
    for app in USER_OF:
        files += [LOG_DIR / f"{app}.out.log", LOG_DIR / f"{app}.err.log"]
    for path in files:
        stat = run("stat", "-c", "%a %U %G", str(path)).stdout.split()
        assert stat == ["640", "root", SERVICE_GROUP], (path, stat)
    assert run("stat", "-c", "%a", str(LOG_DIR)).stdout.strip() == "750"
    for user in USER_OF.values():
        assert (
            run("runuser", "-u", user, "--", "cat", str(ROOT / ".env")).returncode == 0
        )
    assert run("runuser", "-u", "nobody", "--", "cat", str(ROOT / ".env")).returncode
    assert run("runuser", "-u", "nobody", "--", "cat", str(files[1])).returncode


def attempt(user, password, action):
    """'ok', or the error of action(channel) as user on the local broker."""
    params = pika.ConnectionParameters(
        "127.0.0.1",
        int(ENV["RABBITMQ_PORT"]),
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1,
        socket_timeout=5,
    )
    try:
        with pika.BlockingConnection(params) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            action(channel)
        return "ok"
    except pika.exceptions.AMQPError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_rabbitmq_users_can_do_only_their_job(apps):
    queue = ENV["RABBITMQ_QUEUE"]
    gateway = ENV["RABBITMQ_GATEWAY_USER"], ENV["RABBITMQ_GATEWAY_PASSWORD"]
    billing = ENV["RABBITMQ_BILLING_USER"], ENV["RABBITMQ_BILLING_PASSWORD"]
    refused = {
        "gateway basic_get": (gateway, lambda ch: ch.basic_get(queue)),
        "gateway purge": (gateway, lambda ch: ch.queue_purge(queue)),
        "gateway delete": (gateway, lambda ch: ch.queue_delete(queue)),
        "gateway delete dead": (gateway, lambda ch: ch.queue_delete(f"{queue}.dead")),
        "billing publish elsewhere": (
            billing,
            lambda ch: ch.basic_publish("", f"{queue}.dead", b"x", mandatory=True),
        ),
        "billing delete": (billing, lambda ch: ch.queue_delete(queue)),
    }
    for what, (login, action) in refused.items():
        result = attempt(*login, action)
        # Logged in, then refused that one action (not a refused login).
        assert result.startswith("ChannelClosedByBroker: (403"), (what, result)
    allowed = {
        "gateway check": (gateway, lambda ch: ch.queue_declare(queue, passive=True)),
        "billing check": (billing, lambda ch: ch.queue_declare(queue, passive=True)),
    }
    for what, (login, action) in allowed.items():
        assert attempt(*login, action) == "ok", what
    # Users that may not declare still serve: both check that the queues exist.
    url = f"http://127.0.0.1:{ENV['GATEWAY_PORT']}/health"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert json.loads(resp.read())["rabbitmq"] == "ok"
    consumers = run("rabbitmqctl", "-q", "list_consumers", "queue_name", "channel_pid")
    assert queue in consumers.stdout.split(), consumers.stdout
    # The machine's own guest stays (the tests use it on 127.0.0.1).
    assert "guest" in run("rabbitmqctl", "-q", "list_users").stdout.split()


def test_database_roles_own_only_their_database(apps):
    with helpers.admin_connect() as conn:
        for role, db in (
            (ENV["INVENTORY_DB_USER"], ENV["INVENTORY_DB_NAME"]),
            (ENV["BILLING_DB_USER"], ENV["BILLING_DB_NAME"]),
        ):
            flags = conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles"
                " WHERE rolname = %s",
                (role,),
            ).fetchall()
            assert flags == [(False, False, False)], role
            owned = {
                r[0]
                for r in conn.execute(
                    "SELECT datname FROM pg_database d"
                    " JOIN pg_roles r ON r.oid = d.datdba WHERE r.rolname = %s",
                    (role,),
                )
            }
            # The tests' and the benchmark's copies belong to the same role.
            assert db in owned and owned <= {
                db,
                "movies_test",
                "billing_test",
                "bench_movies",
                "bench_billing",
            }, owned
