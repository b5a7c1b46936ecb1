"""Poison messages: whatever billing is sent, the orders behind it get stored."""

import json
import time

import helpers
import pytest

POISON = {
    "not_json": [b"not json", b"\xff\xfe\x00 garbage", b"", b'{"user_id": 1,'],
    "wrong_types": [
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"user_id": "abc", "number_of_items": 1, "total_amount": 1}',
        b'{"user_id": [1], "number_of_items": 1, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": true, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": {"a": 1}}',
    ],
    "huge_values": [
        b'{"user_id": 2147483648, "number_of_items": 1, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": 1e30, "total_amount": 1}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e30}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e999999999}',
        b'{"user_id": 1, "number_of_items": 1, "total_amount": ' + b"9" * 5000 + b"}",
    ],
    "mib_body": [
        b"x" * helpers.MIB,
        b"[" * helpers.MIB,
        json.dumps(list(range(150_000))).encode()[: helpers.MIB],
    ],
    "message_id_nul": ["poison\x00id"],
    "message_id_binary": [b"\xff\xfe\xfd"],
}


@pytest.mark.parametrize("kind", list(POISON))
def test_poison_message_never_blocks_orders_behind_it(procs, queue, orders_db, kind):
    first = 5_000_000 + list(POISON).index(kind) * 1000
    good = [helpers.order(first + i) for i in range(3)]
    if kind.startswith("message_id"):
        # a valid order with a message_id PostgreSQL text cannot hold
        poison = [json.dumps(helpers.order(first + 500))]
        poison_ids = POISON[kind]
    else:
        poison = POISON[kind]
        poison_ids = [f"poison-{kind}-{i}" for i in range(len(poison))]
    bodies = [good[0], *poison, good[1], *poison, good[2]]
    ids = ["g0", *poison_ids, "g1", *[None] * len(poison), "g2"]
    good_ids = ("g0", "g1", "g2")
    helpers.publish_raw(
        queue,
        bodies,
        [helpers.message_id(f"{kind}-{m}") if m in good_ids else m for m in ids],
    )
    start = time.monotonic()
    billing = procs("billing", helpers.billing_env(queue))
    try:
        helpers.wait_for(
            lambda: (
                len(helpers.stored_users(first, first + 2)) == 3 or billing.proc.poll()
            ),
            timeout=20,
            what="the good orders behind the poison",
        )
    finally:
        alive = billing.proc.poll() is None
    assert alive, f"billing died on {kind}: {billing.tail(3)}"
    seconds = time.monotonic() - start
    assert helpers.stored_users(first, first + 2) == {
        first: 1,
        first + 1: 1,
        first + 2: 1,
    }
    helpers.wait_for(lambda: helpers.queue_depth(queue) == 0, what="the queue to empty")
    assert billing.stop() == 0
    dead = helpers.queue_depth(f"{queue}.dead")
    stored_poison = len(helpers.stored_users(first + 3, first + 999))
    assert dead + stored_poison == 2 * len(poison), (dead, stored_poison)
    assert helpers.queue_depth(queue) == 0
    helpers.figure(
        f"poison.{kind}",
        poison=2 * len(poison),
        good=3,
        stored_good=3,
        dead_lettered=dead,
        stored_poison=stored_poison,
        blocked=0,
        seconds=f"{seconds:.1f}",
    )
