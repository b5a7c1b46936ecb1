"""Test helpers for the fault tests: traffic that records every answer,
outages, and the figures each test prints."""

import collections
import contextlib
import http.client
import itertools
import json
import socket
import struct
import threading
import time

from helpers_core import ENV
from helpers_core import call
from helpers_core import free_port
from helpers_core import gateway_env
from helpers_core import wait_for
from helpers_postgres import stored_users

REQUEST_TIMEOUT = 10  # the services' deadline for a whole request
ANSWER_WITHIN = 5  # seconds: nothing may hang longer during an outage
MIB = 1024 * 1024
CLIENT_ERRORS = (OSError, http.client.HTTPException)


def figure(name, **values):
    """Print a fault test's measurements as one line: FIGURE faults.<name>: k=v ..."""
    print(f"\nFIGURE faults.{name}: " + " ".join(f"{k}={v}" for k, v in values.items()))


def order(user_id, items=1, amount="1.50"):
    """A valid order body."""
    return {"user_id": user_id, "number_of_items": items, "total_amount": amount}


def start_gateway(procs, inventory_port, queue):
    """A gateway of the test's own, with the deployed INVENTORY_TIMEOUT."""
    port = free_port()
    env = gateway_env(port, inventory_port, queue)
    env["INVENTORY_TIMEOUT"] = ENV["INVENTORY_TIMEOUT"]  # 10 s, longer than DB_WAIT
    gateway = procs("gateway", env, port)
    wait_for(
        lambda: call(gateway.url, "GET", "/health")[0] == 200,
        what="gateway /health to answer 200",
    )
    return gateway


class Client:
    """One keep-alive HTTP/1.1 connection; reopened after an error."""

    def __init__(self, port, timeout=10):
        self.port, self.timeout, self.conn = port, timeout, None

    def request(self, method, path, body=None):
        """Return (status, JSON or bytes); raise OSError/HTTPException on failure."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=self.timeout
            )
        raw = None if body is None else json.dumps(body).encode()
        headers = {} if raw is None else {"Content-Type": "application/json"}
        try:
            self.conn.request(method, path, body=raw, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except CLIENT_ERRORS:
            self.close()
            raise
        if resp.will_close:
            self.close()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            data = json.loads(data)
        return resp.status, data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Posters:
    """Threads posting orders with unique user_ids to a gateway until stopped."""

    def __init__(self, port, threads, first_user):
        self.port, self.threads = port, threads
        self.first_user = first_user
        self._ids = itertools.count(first_user)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = []
        self.results = []  # (user_id, status or error name, seconds, started at)

    def start(self):
        for _ in range(self.threads):
            worker = threading.Thread(target=self._post, daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self):
        self._stop.set()
        for worker in self._workers:
            worker.join(30)
        assert not any(w.is_alive() for w in self._workers), "a poster hung"

    def _post(self):
        client = Client(self.port)
        while not self._stop.is_set():
            user = next(self._ids)
            start = time.monotonic()
            try:
                status, _ = client.request("POST", "/api/billing", order(user))
            except CLIENT_ERRORS as exc:
                status = type(exc).__name__
            with self._lock:
                self.results.append((user, status, time.monotonic() - start, start))
            time.sleep(0.005 if status == 200 else 0.05)
        client.close()

    def ok_since(self, moment):
        """Orders answered 200 that were sent after moment."""
        with self._lock:
            return sum(1 for _, s, _, t in self.results if s == 200 and t >= moment)

    @property
    def last_user(self):
        return self.first_user + len(self.results) + self.threads

    def summary(self):
        """(users answered 200, other users, Counter of statuses, max seconds)."""
        ok = {u for u, s, _, _ in self.results if s == 200}
        other = {u for u, s, _, _ in self.results if s != 200}
        statuses = collections.Counter(s for _, s, _, _ in self.results)
        slowest = max(d for _, _, d, _ in self.results)
        return ok, other, statuses, slowest


class TcpProxy:
    """A stand-in for a node: forwards connections made to (address, port) to
    target. outbound holds the local ports of its own connections to target
    (as the broker sees them); close() resets every connection it carries."""

    def __init__(self, address, port, target):
        self.target, self.accepted, self.outbound = target, 0, set()
        self._server = socket.create_server((address, port))
        self._open = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, 3)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self.outbound.add(upstream.getsockname()[1])
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        """Stop listening, and reset each connection (SO_LINGER 0): a node gone."""
        self._server.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    sock.close()
            self._open.clear()


def wait_stored(ok_users, low, high, timeout=60):
    """Wait until every user in ok_users has an order; return the final counts."""
    wait_for(
        lambda: ok_users <= set(stored_users(low, high)),
        timeout=timeout,
        what=f"{len(ok_users)} confirmed orders to be stored",
    )
    time.sleep(0.5)  # let a late duplicate show up, if there were one
    return stored_users(low, high)


def timed_call(service, method, path, body=None):
    """Call service; return (status, answer, seconds it took)."""
    start = time.monotonic()
    status, _, answer = call(service.url, method, path, body)
    return status, answer, time.monotonic() - start
