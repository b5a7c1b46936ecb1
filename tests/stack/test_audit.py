"""The reviewer's audit checklist (steps 3-16) replayed on this machine.

Runs against the stack that ./scripts/up.sh starts: the gateway on 127.0.0.1,
inventory_app, billing_app and api_gateway under root's PM2, and the real
movies_db and billing_db. Each run uses its own random user ids and movie title
so that a rerun proves something. The Vagrant and shell checks need the
`vagrant` and `shellcheck` commands (scripts/test.sh installs them).
"""

import json
import os
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import helpers
import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[2]
ENV = {**dotenv_values(ROOT / ".env"), **os.environ}
GATEWAY = f"http://127.0.0.1:{ENV.get('GATEWAY_PORT', '3000')}"
MOVIES_DB = ENV.get("INVENTORY_DB_NAME", "movies_db")
BILLING_DB = ENV.get("BILLING_DB_NAME", "billing_db")
APPS = ("inventory_app", "billing_app", "api_gateway")
START_HINT = "start the stack with: sudo ./scripts/up.sh"
# /health's verdicts; the body also reports the billing queue.
HEALTHY = {"status": "ok", "inventory": "ok", "rabbitmq": "ok"}


# --- Helpers ---


def request(method, path, body=None):
    """Call the gateway; return (status, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(GATEWAY + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:
        pytest.fail(f"gateway {GATEWAY} unreachable ({exc}); {START_HINT}")
    return status, json.loads(raw) if raw else None


def run(*cmd, timeout=60):
    """Run a command; return the completed process (stdout and stderr as text)."""
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"`{cmd[0]}` is not installed; scripts/test.sh installs it")
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def sql(db, query):
    """Rows of a query run by psql as the postgres superuser over the Unix socket."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", "psql"]
    else:
        cmd = ["psql", "-U", "postgres"]
    proc = subprocess.run(
        [
            *cmd,
            "-X",
            "-A",
            "-t",
            "-F",
            "\x1f",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            query,
        ],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"psql -d {db} failed: {proc.stderr}"
    return [line.split("\x1f") for line in proc.stdout.splitlines() if line]


def pm2_status():
    """{app name: PM2 status} from root's PM2."""
    proc = run("pm2", "jlist")
    assert proc.returncode == 0, f"pm2 jlist failed: {proc.stderr}"
    listing = json.loads(proc.stdout[proc.stdout.index("[") :])
    return {app["name"]: app["pm2_env"]["status"] for app in listing}


def order_rows(user_id):
    """billing_db rows of this user, as (number_of_items, total_amount)."""
    return sql(
        BILLING_DB,
        "SELECT number_of_items, total_amount FROM orders "
        f"WHERE user_id = {int(user_id)} ORDER BY id",
    )


def new_user_id():
    """A user id no earlier run used (well below the 2147483647 limit)."""
    return random.randint(10**8, 2 * 10**9)


# --- Fixtures ---


@pytest.fixture(scope="module")
def stack():
    """The running stack: health 200 and the three PM2 apps online."""
    try:
        with urllib.request.urlopen(GATEWAY + "/health", timeout=5) as resp:
            health = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        pytest.fail(
            f"{GATEWAY}/health answered {exc.code}: {exc.read()!r}; {START_HINT}"
        )
    except OSError as exc:
        pytest.fail(f"gateway {GATEWAY} unreachable ({exc}); {START_HINT}")
    assert {k: health.get(k) for k in HEALTHY} == HEALTHY, health
    status = pm2_status()
    offline = [app for app in APPS if status.get(app) != "online"]
    if offline:
        pytest.fail(f"not online under root's PM2: {', '.join(offline)}; {START_HINT}")


# --- Audit steps ---


def test_movie_is_created_listed_and_stored(stack):
    """Steps 6, 7, 9, 10: POST 201, GET 200 lists it, row in movies_db.movies."""
    title = f"A new movie {uuid.uuid4().hex[:12]}"
    status, movie = request(
        "POST",
        "/api/movies/",
        {"title": title, "description": "Very short description"},
    )
    assert status == 201, movie
    assert movie["title"] == title
    assert movie["description"] == "Very short description"

    status, movies = request("GET", "/api/movies/")
    assert status == 200
    assert movie in movies

    assert [
        row[0]
        for row in sql(
            "postgres", f"SELECT datname FROM pg_database WHERE datname = '{MOVIES_DB}'"
        )
    ] == [MOVIES_DB]
    rows = sql(
        MOVIES_DB,
        f"SELECT title, description FROM movies WHERE id = {int(movie['id'])}",
    )
    assert rows == [[title, "Very short description"]]


def test_billing_order_waits_while_billing_app_is_stopped(stack):
    """Steps 11-16: orders are stored; one posted while billing_app is stopped
    is stored only once billing_app runs again."""
    first, second = new_user_id(), new_user_id()

    status, body = request(
        "POST",
        "/api/billing/",
        {"user_id": str(first), "number_of_items": "99", "total_amount": "250"},
    )
    assert (status, body) == (200, {"message": "Message posted"})
    rows = helpers.wait_for(
        lambda: order_rows(first), 20, interval=0.5, what="the first order stored"
    )
    assert rows == [["99", "250.00"]]

    try:
        assert run("pm2", "stop", "billing_app").returncode == 0
        assert pm2_status()["billing_app"] == "stopped"
        listing = run("pm2", "list").stdout
        assert any(
            "billing_app" in line and "stopped" in line for line in listing.splitlines()
        )

        status, body = request(
            "POST",
            "/api/billing/",
            {"user_id": str(second), "number_of_items": "10", "total_amount": "50"},
        )
        assert (status, body) == (200, {"message": "Message posted"})
        time.sleep(3)
        assert order_rows(second) == []
        assert order_rows(first) == [["99", "250.00"]]
    finally:
        run("pm2", "start", "billing_app")

    helpers.wait_for(
        lambda: pm2_status()["billing_app"] == "online",
        10,
        interval=0.5,
        what="billing_app online",
    )
    rows = helpers.wait_for(
        lambda: order_rows(second), 20, interval=0.5, what="the second order stored"
    )
    assert rows == [["10", "50.00"]]


def test_billing_database_is_listed(stack):
    """Step 14: billing_db exists, with table orders owned by the service role."""
    owner = sql(
        BILLING_DB, "SELECT tableowner FROM pg_tables WHERE tablename = 'orders'"
    )
    assert owner == [[ENV.get("BILLING_DB_USER", "billing_user")]]


# --- Vagrant and shell ---


def vagrant(*args):
    """Run vagrant in the repository without calling HashiCorp's servers."""
    if shutil.which("vagrant") is None:
        pytest.fail(
            "`vagrant` is not installed; scripts/test.sh installs it (apt-get install vagrant)"
        )
    return subprocess.run(
        ["vagrant", *args],
        cwd=ROOT,
        env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_vagrantfile_validates():
    """Step 3 as far as this machine goes: a valid Vagrantfile with three VMs."""
    proc = vagrant("validate", "--ignore-provider")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Plain validate and status need a provider plugin; VirtualBox is not here.
    hint = "vagrant needs a provider here: apt-get install vagrant-libvirt\n"
    proc = vagrant("validate")
    assert proc.returncode == 0, hint + proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout
    proc = vagrant("status")
    assert proc.returncode == 0, hint + proc.stdout + proc.stderr
    for name in ("gateway-vm", "inventory-vm", "billing-vm"):
        assert name in proc.stdout, hint + proc.stdout


def test_scripts_pass_shellcheck():
    """Step 5: every script in scripts/ is shellcheck clean."""
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.sh"))
    assert scripts
    proc = run("shellcheck", *scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bring_up_again_changes_nothing(stack):
    """./scripts/up.sh a second time: same data, apps online, health 200."""
    movies = sql(MOVIES_DB, "SELECT count(*), coalesce(max(id), 0) FROM movies")
    orders = sql(BILLING_DB, "SELECT count(*), coalesce(max(id), 0) FROM orders")
    proc = run(str(ROOT / "scripts" / "up.sh"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sql(MOVIES_DB, "SELECT count(*), coalesce(max(id), 0) FROM movies") == movies
    assert (
        sql(BILLING_DB, "SELECT count(*), coalesce(max(id), 0) FROM orders") == orders
    )
    assert all(pm2_status().get(app) == "online" for app in APPS)
    status, health = request("GET", "/health")
    assert status == 200 and {k: health.get(k) for k in HEALTHY} == HEALTHY, health
