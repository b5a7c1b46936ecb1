"""One fault under load, judged: the body of the host tier's fault tests
(tests/hosts/test_hosts_faults.py, and the cluster's in
test_hosts_grown_to_a_cluster.py). Clients record every operation through the
gateway from the reviewer's address (helpers_checker) while the fault is on and
until /health is 200 again; then the checker compares what they were told with
what billing_db and movies_db hold, and one row goes to the table at the end.
"""

import collections
import statistics
import time

import helpers
from helpers_checker import HEALTH_STATUSES
from helpers_checker import MOVIE_DEADLINE
from helpers_checker import MOVIE_STATUSES
from helpers_checker import ORDER_DEADLINE
from helpers_checker import ORDER_STATUSES
from helpers_checker import Recorder
from helpers_checker import call
from helpers_checker import health_said
from helpers_checker import healthy
from helpers_checker import judge_movies
from helpers_checker import judge_orders
from helpers_checker import order_body
from helpers_checker import stored_movies
from helpers_checker import stored_orders
from helpers_hosts import BILLING_DB
from helpers_hosts import BILLING_VM
from helpers_hosts import FAULT_ROWS
from helpers_hosts import figure
from helpers_hosts import gateway_healthy
from helpers_hosts import psql
from helpers_hosts import queue_depth
from helpers_injector import Crash
from helpers_injector import injected

WINDOW = 20  # seconds each partition or pause lasts
BEFORE = 2  # seconds of traffic before it
RECOVER_WITHIN = 60  # seconds for /health to turn 200 after healing
AFTER = 2  # seconds of traffic once it has
DRAIN_WITHIN = 60


def run_fault(fault, index, window=WINDOW):
    """Run fault under the recorder's load and judge it (test_fault): nothing
    acknowledged is lost or doubled, no unexpected row, no 500, no answer past
    its deadline, and /health recovers by itself. Returns the table row."""
    helpers.wait_for(gateway_healthy, 120, interval=0.5, what="health 200 first")
    label = f"fault{index}-{time.time_ns() % 10**9}"
    # User ids above every stored one: a row of an earlier run is not this one's.
    (above,) = psql(
        BILLING_VM, BILLING_DB, "SELECT coalesce(max(user_id), 0) FROM orders"
    )
    recorder = Recorder(label, first_user=int(above[0]) + 1000).start()
    try:
        time.sleep(BEFORE)
        began = time.monotonic()
        with injected(fault):
            time.sleep(window if fault.window is None else fault.window)
            # Orders waiting in the queue: billing could not store them.
            waiting = queue_depth(check=False) if fault.window is None else None
            # A cluster's fault may not show to clients: it shows on its host.
            seen = fault.seen() if hasattr(fault, "seen") else False
        healed = time.monotonic()
        helpers.wait_for(
            lambda: any(
                healthy(op)
                for op in recorder.ops
                if op.kind == "health" and op.start > healed
            ),
            RECOVER_WITHIN,
            interval=0.2,
            what=f"/health 200 again after healing {fault.name}",
        )
        time.sleep(AFTER)
    finally:
        recorder.stop()
    ops = recorder.ops

    # Orders: every one answered 200 is stored once; then the in-doubt ones
    # are sent again with their key, and none makes a second row.
    first, last = recorder.first_user, recorder.last_user
    acked = {op.key for op in ops if op.kind == "order" and op.status == 200}
    helpers.wait_for(
        lambda: acked <= set(stored_orders(first, last)) and queue_depth() == 0,
        DRAIN_WITHIN,
        interval=1,
        what="billing to drain the queue",
    )
    verdict = judge_orders(ops, stored_orders(first, last))
    in_doubt = sorted({op.key for op in ops if op.kind == "order"} - acked)
    box = [None]
    for user in in_doubt:
        status = None
        for _ in range(10):
            status = call(
                box,
                "POST",
                "/api/billing/",
                order_body(user),
                {"Idempotency-Key": recorder.keys[user]},
            )[0]
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, f"the retry of order {user} got {status}"
    helpers.wait_for(
        lambda: queue_depth() == 0 and set(in_doubt) <= set(stored_orders(first, last)),
        DRAIN_WITHIN,
        interval=1,
        what="the retried orders stored",
    )
    after_retry = stored_orders(first, last)
    retried_twice = sum(1 for user in in_doubt if after_retry.get(user) != 1)

    movies = judge_movies(ops, stored_movies(label), box)

    # Statuses and deadlines.
    allowed = {"order": ORDER_STATUSES, "health": HEALTH_STATUSES}
    deadline = {"order": ORDER_DEADLINE}
    wrong = [op for op in ops if op.status not in allowed.get(op.kind, MOVIE_STATUSES)]
    slow = [op for op in ops if op.latency > deadline.get(op.kind, MOVIE_DEADLINE)]

    health = [op for op in ops if op.kind == "health"]
    # When each /health answer came: a slow one shows the fault only then.
    shown = next(
        (
            op.start + op.latency - began
            for op in health
            if op.start >= began and not healthy(op)
        ),
        None,
    )
    back = next(op.start - healed for op in health if op.start > healed and healthy(op))
    statuses = [op.status for op in ops if op.kind != "health"]
    latencies = sorted(op.latency for op in ops if op.kind != "health")
    row = {
        "fault": fault.name,
        "ops": len(statuses),
        "2xx": sum(1 for s in statuses if s is not None and 200 <= s < 300),
        "502": statuses.count(502),
        "503": statuses.count(503),
        "504": statuses.count(504),
        "timeouts": statuses.count(None),
        "lost": verdict["lost"]
        + movies["lost"]
        + movies["stale"]
        + movies["resurrected"],
        "duplicated": verdict["duplicated"] + retried_twice,
        "unexpected": verdict["unexpected"] + movies["unexpected"],
        "in doubt": verdict["in_doubt"],
        "recovered": verdict["recovered"] + movies["recovered"],
        "p99 ms": round(statistics.quantiles(latencies, n=100)[98] * 1000),
        "health shows it (s)": "-" if shown is None else f"{shown:.1f}",
        "health 200 (s)": f"{back:.1f}",
    }
    if getattr(fault, "back_in", None) is not None:
        row["fault"] += f" (back in {fault.back_in:.0f} s)"
    FAULT_ROWS.append(row)
    said = collections.Counter(health_said(op) for op in health if not healthy(op))
    figure(
        f"faults: {fault.name}: orders {verdict}; movies {movies};"
        f" /health said {dict(said) or 'ok throughout'}"
    )

    # Every fault had an effect: /health showed it, billing fell behind,
    # systemd started the crashed service again after the kill, or the host
    # showed it (a paused or cut-off RabbitMQ node of a cluster).
    restarted = (getattr(fault, "back_in", None) or 0) > 0
    assert shown is not None or (waiting or 0) > 0 or restarted or seen, (
        f"{fault.name}: no effect"
    )
    assert verdict["lost"] == verdict["duplicated"] == verdict["unexpected"] == 0, (
        verdict
    )
    assert retried_twice == 0, f"{retried_twice} retried orders stored twice"
    assert movies["lost"] == movies["stale"] == movies["resurrected"] == 0, movies
    assert movies["unexpected"] == 0, movies
    assert not wrong, f"answers outside the documented statuses: {wrong[:5]}"
    assert not slow, f"answers past their deadline: {slow[:5]}"
    assert statuses.count(None) == 0
    if isinstance(fault, Crash):
        assert fault.back_in is not None, f"systemd did not bring {fault.unit} back"
        assert fault.back_in > 0, f"{fault.unit} was not restarted after the kill"
    return row
