"""down.sh --purge removes everything up.sh leaves, and nothing else.

Run for real on a throwaway copy of the repository: its own role, database,
RabbitMQ user and queue names (the environment wins over .env), its own ports
and its own PM2 daemon (PM2_HOME), so the stack of ./scripts/up.sh and the
machine's other databases and broker users stay as they are. Slow (up.sh
creates three virtualenvs and runs npm ci): about a minute.
"""

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import helpers
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = "*/main/conf.d/50-movie-shop.conf"
NOBODY = pwd.getpwnam("nobody")
NAMES = {
    "INVENTORY_DB_NAME": "purge_movies",
    "INVENTORY_DB_USER": "purge_inventory",
    "BILLING_DB_NAME": "purge_billing",
    "BILLING_DB_USER": "purge_billing_user",
    "RABBITMQ_GATEWAY_USER": "purge_gateway_mq",
    "RABBITMQ_BILLING_USER": "purge_billing_mq",
    "RABBITMQ_QUEUE": "purge_queue",
}


def run(script, env, *args):
    """Run a script of the copy as root; fail with its output if it fails."""
    done = subprocess.run(
        [str(script), *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{script.name} {args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def machine_state(env):
    """What up.sh may leave behind, as far as it concerns the copy's names."""
    with helpers.admin_connect() as conn:
        roles = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles")}
        dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        hba_file = conn.execute("SHOW hba_file").fetchone()[0]
    users = subprocess.run(
        ["rabbitmqctl", "-q", "list_users"], check=True, capture_output=True, text=True
    ).stdout.split()
    queues = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return roles, dbs, Path(hba_file).read_text(), users, queues


def acl(path):
    """The named entries of path's ACL (user:NAME:... and group:NAME:...)."""
    out = subprocess.run(
        ["getfacl", "-cp", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [line for line in out.split() if line.split(":")[1:2] != [""]]


def run_as_nobody(*cmd):
    """Run cmd as the clone's owner."""
    return subprocess.run(["runuser", "-u", "nobody", "--", *cmd], capture_output=True)


@pytest.fixture
def copy(tmp_path):
    """A copy of the repository without its venv/, logs/ or node_modules/, as a
    user's clone: owned by nobody, in a directory closed to others (a home)."""
    outer = Path(tempfile.mkdtemp(prefix="movie-shop-purge-"))
    outer.chmod(0o700)
    target = outer / "repo"
    skip = shutil.ignore_patterns(
        "venv", "logs", "node_modules", ".git", ".*cache", "__pycache__"
    )
    shutil.copytree(ROOT, target, ignore=skip)
    for path in [outer, target, *target.rglob("*")]:
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    # scripts/test.sh exports lib.sh's paths: the copy must find its own.
    own = ("REPO_DIR", "VENV_ROOT", "LOG_DIR", "PM2_ENV", "PM2_HOME")
    env = {k: v for k, v in os.environ.items() if k not in own}
    env.update(NAMES, PM2_HOME=str(tmp_path / "pm2"))
    env.update(
        GATEWAY_PORT=str(helpers.free_port()), INVENTORY_PORT=str(helpers.free_port())
    )
    # The purge removes this machine-wide file of the project; the stack of
    # ./scripts/up.sh gets it back.
    conf = {p: p.read_bytes() for p in Path("/etc/postgresql").glob(CONF)}
    yield target, env
    for path, text in conf.items():
        path.write_bytes(text)
    # Whatever the test left: try the purge again, then the PM2 daemon.
    subprocess.run(
        [str(target / "scripts" / "down.sh"), "--purge"], env=env, check=False
    )
    subprocess.run(["pm2", "kill"], env=env, check=False, capture_output=True)
    shutil.rmtree(outer, ignore_errors=True)


def test_purge_removes_what_up_sh_left_and_nothing_else(copy):
    repo, env = copy
    # What an earlier, interrupted run of this test left is not the machine's.
    subprocess.run(
        [str(repo / "scripts" / "down.sh"), "--purge"],
        env=env,
        check=False,
        capture_output=True,
    )
    before = machine_state(env)
    run(repo / "scripts" / "up.sh", env)
    roles, dbs, hba, users, queues = machine_state(env)
    assert {"purge_inventory", "purge_billing_user"} <= roles
    assert {"purge_movies", "purge_billing"} <= dbs
    assert "host    purge_movies    purge_inventory    127.0.0.1/32" in hba
    assert {"purge_gateway_mq", "purge_billing_mq"} <= set(users)
    assert "purge_queue" in queues
    for name in ("venv", "logs", "node_modules"):
        assert (repo / name).is_dir(), name
    apps = json.loads(
        subprocess.run(
            ["pm2", "jlist"], env=env, check=True, capture_output=True
        ).stdout
    )
    assert sorted(a["name"] for a in apps) == [
        "api_gateway",
        "billing_app",
        "inventory_app",
    ]
    assert {a["pm2_env"]["status"] for a in apps} == {"online"}
    # The clone's owner still reads .env; the services passed through outer.
    assert acl(repo.parent) == ["group:movie-shop:--x"]
    assert run_as_nobody("cat", str(repo / ".env")).returncode == 0
    # What a test run as root leaves in the clone.
    (repo / "tests" / "__pycache__").mkdir(exist_ok=True)

    out = run(repo / "scripts" / "down.sh", env, "--purge")
    assert "purged" in out
    assert machine_state(env) == before
    for name in ("venv", "logs", "node_modules", "tests/__pycache__"):
        assert not (repo / name).exists(), name
    assert acl(repo.parent) == acl(repo / ".env") == []
    assert oct(repo.parent.stat().st_mode & 0o777) == "0o700"
    env_file = (repo / ".env").stat()
    assert (env_file.st_uid, oct(env_file.st_mode & 0o777)) == (NOBODY.pw_uid, "0o644")
    assert not Path(env["PM2_HOME"]).exists()
    assert not list(Path("/etc/postgresql").glob(CONF))
    # The main stack's roles and the machine's own users are still there.
    roles, dbs, hba, users, queues = machine_state(env)
    assert "guest" in users
    assert {"postgres", "root"} <= roles
    assert {"postgres", "test"} <= dbs

    run(repo / "scripts" / "down.sh", env, "--purge")  # safe to run again
