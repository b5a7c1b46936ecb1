"""Test helpers every tier shares: settings, free ports, waiting, HTTP calls,
and the services run as subprocesses.

Fixtures live in conftest.py; test modules `import helpers`. The tests never
touch the stack's own databases (movies_db, billing_db) or queue: they use
movies_test, billing_test and queues of their own, and run each service on a
free port, so they can run beside ./scripts/up.sh.
"""

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the services are single modules at the top

ENV = dotenv_values(ROOT / ".env")
PYTHON = sys.executable
MOVIES_TEST_DB = "movies_test"
BILLING_TEST_DB = "billing_test"
LOGS = ROOT / "logs" / "tests"


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """One of the three services, run as a subprocess with its own settings."""

    def __init__(self, name, env, port=None):
        self.name, self.port, self.proc = name, port, None
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{name}-{uuid.uuid4().hex[:8]}.log"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait=True):
        """Start the process and, for HTTP services, wait until it listens."""
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [PYTHON, str(ROOT / f"{self.name}.py")],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait and self.port:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            pytest.fail(f"{self.name} did not listen on {self.port}: {self.tail()}")
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send sig and wait for the exit; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def tail(self, lines=30):
        """The end of the service's log."""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def mapped_files(pid):
    """The files a process has mapped, from /proc/<pid>/maps."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split()[-1] for line in maps if "/" in line}


def inventory_env(port):
    """Settings for a test inventory on port, using movies_test."""
    return {
        "INVENTORY_HOST": "127.0.0.1",
        "INVENTORY_PORT": str(port),
        "INVENTORY_DB_HOST": "127.0.0.1",
        "INVENTORY_DB_NAME": MOVIES_TEST_DB,
        # Tests hold table locks past DB_WAIT on purpose: room before the
        # database cancels the queries waiting on them.
        "INVENTORY_QUERY_TIMEOUT": "8",
    }


def rabbit_env(queue):
    """Settings pointing a service at the local RabbitMQ and a test queue."""
    return {
        "RABBITMQ_HOST": "127.0.0.1",
        "RABBITMQ_PORT": "5672",
        "RABBITMQ_GATEWAY_USER": "guest",
        "RABBITMQ_GATEWAY_PASSWORD": "guest",
        "RABBITMQ_BILLING_USER": "guest",
        "RABBITMQ_BILLING_PASSWORD": "guest",
        "RABBITMQ_QUEUE": queue,
    }


def billing_env(queue):
    """Settings for a test billing consumer on billing_test and queue."""
    return {
        **rabbit_env(queue),
        "BILLING_DB_HOST": "127.0.0.1",
        "BILLING_DB_NAME": BILLING_TEST_DB,
    }


def gateway_env(port, inventory_port, queue):
    """Settings for a test gateway in front of a test inventory and queue."""
    return {
        **rabbit_env(queue),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "INVENTORY_HOST": "127.0.0.1",
        "INVENTORY_PORT": str(inventory_port),
        "INVENTORY_TIMEOUT": "6",  # above inventory's own 4 s database wait
    }


def call(base, method, path, body=None, headers=None, raw=None):
    """One HTTP request; return (status, headers, parsed JSON or raw bytes)."""
    url = base.removeprefix("http://")
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    headers = dict(headers or {})
    if body is not None:
        raw = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=raw, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    parsed = json.loads(data) if ctype.startswith("application/json") else data
    return resp.status, dict(resp.getheaders()), parsed


def wait_for(predicate, timeout=20, *, interval=0.1, what="condition"):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def shared_block(text, name):
    """The text of shared block name in a service's source (scripts/shared_blocks.py)."""
    spec = importlib.util.spec_from_file_location(
        "shared_blocks", ROOT / "scripts" / "shared_blocks.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    start, end = tool.blocks(text)[name][1]
    return text[start:end]
