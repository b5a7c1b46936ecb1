"""Clients that record every operation, and the checker that judges them.

During a fault, Recorder runs clients from the reviewer's address through the
gateway: orders (a unique user_id and an Idempotency-Key each), movie creates,
updates, deletes and reads, and a /health poller. Each operation is kept with
its request, status, body and latency. Afterwards check_orders and
check_movies compare that history with what the databases hold, as Jepsen's
total-queue checker does: lost, unexpected, duplicated, recovered.
"""

import http.client
import itertools
import json
import threading
import time
import uuid
from typing import NamedTuple

from helpers_hosts import BILLING_DB
from helpers_hosts import BILLING_VM
from helpers_hosts import BRIDGE_IP
from helpers_hosts import GATEWAY_IP
from helpers_hosts import INVENTORY_VM
from helpers_hosts import MOVIES_DB
from helpers_hosts import VM_ENV
from helpers_hosts import psql

PORT = int(VM_ENV["GATEWAY_PORT"])
# The documented deadlines (docs/design.md): an order is answered within the
# publish timeout, a movie request or /health within inventory's timeout;
# one second more for the network and this machine's two busy cores.
ORDER_DEADLINE = 4 + 1
MOVIE_DEADLINE = int(VM_ENV["INVENTORY_TIMEOUT"]) + 1
CLIENT_TIMEOUT = 30  # an answer later than this is a hang
ORDER_STATUSES = {200, 503}
MOVIE_STATUSES = {200, 201, 404, 502, 503, 504}
HEALTH_STATUSES = {200, 503}
ORDER_CLIENTS, MOVIE_CLIENTS = 6, 4
PACE = 0.05  # seconds: each client sends at most 20 requests a second
MAX_OPS = 1000  # per client: bounded in count as well as in time


class Op(NamedTuple):
    """One operation and its outcome (status None: no answer, see error)."""

    kind: str  # order, create, update, delete, read, health
    key: object  # user_id for an order, movie id (or title) for a movie
    body: object  # what was sent
    status: int | None
    answer: object  # the JSON body, or the error
    start: float  # time.monotonic()
    latency: float


def call(conn_box, method, path, body=None, headers=None):
    """One request on a kept-alive connection from the reviewer's address;
    return (status or None, JSON body or error text, seconds)."""
    start = time.monotonic()
    raw = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if raw is not None else {}
    sent.update(headers or {})
    try:
        if conn_box[0] is None:
            conn_box[0] = http.client.HTTPConnection(
                GATEWAY_IP, PORT, timeout=CLIENT_TIMEOUT, source_address=(BRIDGE_IP, 0)
            )
        conn_box[0].request(method, path, raw, sent)
        resp = conn_box[0].getresponse()
        data = resp.read()
        if resp.will_close:
            conn_box[0].close()
            conn_box[0] = None
        try:
            answer = json.loads(data) if data else None
        except ValueError:
            answer = data[:200]
        return resp.status, answer, time.monotonic() - start
    except (OSError, http.client.HTTPException) as exc:
        if conn_box[0] is not None:
            conn_box[0].close()
            conn_box[0] = None
        return None, f"{type(exc).__name__}: {exc}", time.monotonic() - start


def order_body(user_id):
    return {"user_id": str(user_id), "number_of_items": "2", "total_amount": "9.90"}


class Recorder:
    """Runs the clients until stop(); ops holds every operation."""

    def __init__(self, label, first_user):
        self.label = label  # movie titles start with it
        self.ops: list[Op] = []
        self.keys: dict[int, str] = {}  # user_id -> Idempotency-Key
        self._users = itertools.count(first_user)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._orders, daemon=True)
            for _ in range(ORDER_CLIENTS)
        ]
        self._threads += [
            threading.Thread(target=self._movies, args=(n,), daemon=True)
            for n in range(MOVIE_CLIENTS)
        ]
        self._threads.append(threading.Thread(target=self._health, daemon=True))
        self.first_user = first_user

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def stop(self):
        self._stopping.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a client hangs"
        self.last_user = next(self._users) - 1
        return self

    def _keep(self, op):
        with self._lock:
            self.ops.append(op)

    def _orders(self):
        box = [None]
        for _ in range(MAX_OPS):
            if self._stopping.is_set():
                break
            with self._lock:
                user = next(self._users)
                key = self.keys[user] = uuid.uuid4().hex
            body = order_body(user)
            start = time.monotonic()
            status, answer, took = call(
                box, "POST", "/api/billing/", body, {"Idempotency-Key": key}
            )
            self._keep(Op("order", user, body, status, answer, start, took))
            time.sleep(max(0.0, PACE - took))

    def _movies(self, client):
        box = [None]
        for n in range(MAX_OPS):
            if self._stopping.is_set():
                break
            title = f"{self.label} c{client} m{n}"
            body = {"title": title, "description": "r0"}
            start = time.monotonic()
            status, answer, took = call(box, "POST", "/api/movies/", body)
            self._keep(Op("create", title, body, status, answer, start, took))
            time.sleep(max(0.0, PACE - took))
            if status != 201:
                continue
            path = f"/api/movies/{answer['id']}/"
            for step in ("update", "read", "update", "delete" if n % 2 else "read"):
                if self._stopping.is_set():
                    break
                body = None
                method = {"update": "PUT", "read": "GET", "delete": "DELETE"}[step]
                if step == "update":
                    body = {"description": f"r{uuid.uuid4().hex[:8]}"}
                start = time.monotonic()
                status, reply, took = call(box, method, path, body)
                self._keep(Op(step, answer["id"], body, status, reply, start, took))
                time.sleep(max(0.0, PACE - took))

    def _health(self):
        box = [None]
        while not self._stopping.is_set():
            start = time.monotonic()
            status, answer, took = call(box, "GET", "/health")
            self._keep(Op("health", None, None, status, answer, start, took))
            time.sleep(max(0.0, 0.5 - took))


def healthy(op):
    """Whether a /health operation says all is well."""
    return (
        op.status == 200
        and isinstance(op.answer, dict)
        and all(
            op.answer.get(k) == "ok"
            for k in ("status", "inventory", "rabbitmq", "billing")
        )
    )


def health_said(op):
    """A /health answer in short: its status and the verdicts that are not ok."""
    if not isinstance(op.answer, dict):
        return f"{op.status} {op.answer}"[:80]
    bad = [f"{k}: {op.answer.get(k)}" for k in ("inventory", "rabbitmq", "billing")]
    return f"{op.status} " + "; ".join(b[:60] for b in bad if not b.endswith(": ok"))


def stored_orders(first, last):
    """{user_id: rows} in billing_db for user ids first..last."""
    rows = psql(
        BILLING_VM,
        BILLING_DB,
        "SELECT user_id, count(*) FROM orders"
        f" WHERE user_id BETWEEN {int(first)} AND {int(last)} GROUP BY 1",
    )
    return {int(user): int(count) for user, count in rows}


def judge_orders(ops, stored):
    """The order verdicts of one history against the rows stored."""
    sent = {op.key for op in ops if op.kind == "order"}
    acked = {op.key for op in ops if op.kind == "order" and op.status == 200}
    doubt = sent - acked
    return {
        "acked": len(acked),
        "in_doubt": len(doubt),
        "lost": sum(1 for user in acked if stored.get(user, 0) == 0),
        "duplicated": sum(1 for count in stored.values() if count > 1),
        "unexpected": sum(1 for user in stored if user not in sent),
        "recovered": sum(1 for user in doubt if stored.get(user)),
    }


def judge_movies(ops, rows, box):
    """Movies: every 201 readable by its id through the gateway unless
    deleted, holding the last acknowledged write or one whose outcome is
    unknown; an acknowledged delete stays deleted.

    rows: {id: (title, description)} of the movies of this history, from
    movies_db, for those nobody was told were created."""
    by_id: dict[int, list[Op]] = {}
    created = {}
    for op in ops:
        if op.kind == "create" and op.status == 201:
            created[op.answer["id"]] = op
            by_id.setdefault(op.answer["id"], [])
        elif op.kind in ("update", "delete"):
            by_id.setdefault(op.key, []).append(op)
    lost = stale = resurrected = 0
    for movie_id, writes in by_id.items():
        status, answer, _ = call(box, "GET", f"/api/movies/{movie_id}/")
        assert status in (200, 404), (movie_id, status, answer)
        now = answer["description"] if status == 200 else None
        allowed = {created[movie_id].body["description"]}
        deleted, maybe_deleted = False, False
        for op in sorted(writes, key=lambda o: o.start + o.latency):
            acked = op.status is not None and 200 <= op.status < 300
            unknown = op.status is None or op.status >= 500
            if op.kind == "update" and acked:
                allowed = {op.body["description"]}
            elif op.kind == "update" and unknown:
                allowed.add(op.body["description"])
            elif op.kind == "delete" and acked:
                deleted = True
            elif op.kind == "delete" and unknown:
                maybe_deleted = True
        if deleted:
            resurrected += now is not None
        elif now is None:
            lost += not maybe_deleted
        elif now not in allowed:
            stale += 1
    titles = {op.key for op in ops if op.kind == "create"}
    unexpected = sum(1 for title, _ in rows.values() if title not in titles)
    doubtful = {op.key for op in ops if op.kind == "create" and op.status != 201}
    recovered = sum(1 for title, _ in rows.values() if title in doubtful)
    return {
        "created": len(created),
        "lost": lost,
        "stale": stale,
        "resurrected": resurrected,
        "unexpected": unexpected,
        "recovered": recovered,
    }


def stored_movies(label):
    """{id: (title, description)} in movies_db whose title starts with label."""
    rows = psql(
        INVENTORY_VM,
        MOVIES_DB,
        "SELECT id, title, description FROM movies"
        f" WHERE starts_with(title, '{label} ')",
    )
    return {int(i): (t, d) for i, t, d in rows}
