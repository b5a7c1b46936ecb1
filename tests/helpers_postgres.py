"""Test helpers for this machine's PostgreSQL: the superuser's connection,
the tests' databases, rows, and stopping or starting the cluster."""

import subprocess

import psycopg
import pytest
from helpers_core import ROOT
from helpers_core import wait_for


def admin_connect(dbname="postgres"):
    """A superuser connection (local socket, as the machine's setup allows)."""
    try:
        return psycopg.connect(dbname=dbname, user="postgres", autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable ({exc}); start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        )


def recreate_database(name, owner, password, schema):
    """Drop and create a test database owned by the service role, with schema."""
    with admin_connect() as conn:
        conn.execute(
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner}') THEN
                    CREATE ROLE "{owner}" LOGIN PASSWORD '{password}';
                END IF; END $$"""
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    with admin_connect(name) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        conn.execute(f'SET ROLE "{owner}"')
        conn.execute((ROOT / "sql" / schema).read_text())


def rows(dbname, sql, params=None):
    """Run a query as superuser in a test database; return all rows."""
    with admin_connect(dbname) as conn:
        return conn.execute(sql, params).fetchall()


def pg_online():
    """Whether the machine's PostgreSQL cluster is running."""
    out = subprocess.run(
        ["pg_lsclusters", "-h"], check=False, capture_output=True, text=True
    )
    return " online " in f" {out.stdout} "


def pg(action):
    """Stop or start PostgreSQL; a start waits until it accepts connections."""
    version = subprocess.check_output(["ls", "/etc/postgresql"], text=True).split()[0]
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=False,
        capture_output=True,
        text=True,
    )
    # "already running" / "not running" is fine: the state is what we asked for
    assert done.returncode == 0 or pg_online() == (action == "start"), done.stderr
    if action == "start":
        wait_for(_pg_accepts, timeout=30, what="PostgreSQL to accept connections")


def _pg_accepts():
    try:
        psycopg.connect(dbname="postgres", user="postgres", connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


def count_orders():
    """Rows in billing_test.orders."""
    return rows("billing_test", "SELECT count(*) FROM orders")[0][0]


def stored_users(low, high):
    """{user_id: number of rows} for orders with user_id in [low, high]."""
    found = rows(
        "billing_test",
        "SELECT user_id, count(*) FROM orders WHERE user_id BETWEEN %s AND %s"
        " GROUP BY user_id",
        (low, high),
    )
    return dict(found)
