"""Faults of billing itself: kill -9 three times while it drains a backlog.

Like every test_faults_* module, each test breaks something on purpose, puts
things back in `finally`, and prints one `FIGURE faults.<name>: ...` line
(run with -s to see it).
"""

import json
import random
import signal
import time

import helpers
import pika


def publish_fast(queue, bodies, message_ids):
    """Publish many persistent messages without waiting for each confirm."""
    helpers.publish_raw(queue, [])  # declares the queue and its dead-letter queue
    conn, channel = helpers.rabbit_channel()
    for body, message_id in zip(bodies, message_ids, strict=True):
        props = pika.BasicProperties(delivery_mode=2, message_id=message_id)
        channel.basic_publish("", queue, json.dumps(body), props)
    conn.close()


def test_billing_killed_three_times_while_draining_backlog(procs, queue, orders_db):
    total = 20_000
    publish_fast(
        queue,
        [helpers.order(i + 1) for i in range(total)],
        [helpers.message_id(f"k9-{i}") for i in range(total)],
    )
    helpers.wait_for(
        lambda: helpers.queue_depth(queue) == total, what=f"{total} queued messages"
    )
    billing = procs("billing", helpers.billing_env(queue))
    at_kill = []
    rng = random.Random()
    # one kill early, one a third of the way, one two thirds of the way through
    for low in (1, total // 3, 2 * total // 3):
        threshold = max(low, at_kill[-1] + 1 if at_kill else 1) + rng.randrange(1500)
        helpers.wait_for(
            lambda threshold=threshold: helpers.count_orders() >= threshold,
            timeout=60,
            interval=0.005,
            what=f"billing to store {threshold} orders",
        )
        time.sleep(rng.uniform(0, 0.03))  # land anywhere: mid-batch, pre-ack
        billing.stop(signal.SIGKILL)
        at_kill.append(helpers.count_orders())
        billing.start()
    assert at_kill[-1] < total, f"the backlog was drained before the 3rd kill {at_kill}"
    helpers.wait_for(
        lambda: helpers.count_orders() >= total, timeout=120, what=f"{total} orders"
    )
    assert billing.stop() == 0  # SIGTERM: unacked messages go back to the queue
    stored, users, ids = helpers.rows(
        orders_db,
        "SELECT count(*), count(DISTINCT user_id), count(DISTINCT message_id)"
        " FROM orders",
    )[0]
    assert users == total and ids == total
    assert stored == total, f"{stored - total} orders stored twice"
    assert helpers.queue_depth(queue) == 0 and helpers.queue_depth(f"{queue}.dead") == 0
    helpers.figure(
        "kill9",
        posted=total,
        stored=users,
        lost=total - users,
        duplicated=stored - users,
        kills=3,
        stored_at_kills="/".join(map(str, at_kill)),
    )
