"""RabbitMQ's memory with a backlog of orders: a classic billing_queue against
a quorum one (a single node, as on the three VMs), measured in one run.

    sudo venv/dev/bin/python bench/queue_memory.py [--orders 100000]

Declares each queue as the services would (queue_arguments with
RABBITMQ_QUEUE_TYPE classic, then quorum) on this machine's RabbitMQ, publishes
the orders one by one with confirms, and prints the broker's resident memory
before and after; the queues are deleted afterwards.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gateway

ORDER = json.dumps({"user_id": 1, "number_of_items": 2, "total_amount": "9.90"})


def broker_rss():
    """Resident MiB of RabbitMQ's Erlang VM (the oldest beam.smp)."""
    pid = subprocess.check_output(["pgrep", "-o", "-x", "beam.smp"]).split()[0].decode()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=100_000)
    args = parser.parse_args()
    params = pika.ConnectionParameters("127.0.0.1")
    for kind in ("classic", "quorum"):
        os.environ["RABBITMQ_QUEUE_TYPE"] = kind
        queue = f"bench_memory_{kind}"
        with pika.BlockingConnection(params) as conn:
            channel = conn.channel()
            channel.queue_declare(f"{queue}.dead", durable=True)
            arguments = gateway.queue_arguments(queue)
            channel.queue_declare(queue, durable=True, arguments=arguments)
            time.sleep(2)
            before = broker_rss()
            channel.confirm_delivery()
            props = pika.BasicProperties(delivery_mode=2, message_id="0" * 32)
            start = time.monotonic()
            for _ in range(args.orders):
                channel.basic_publish("", queue, ORDER, props)
            took = time.monotonic() - start
            time.sleep(5)
            after = broker_rss()
            channel.queue_delete(queue)
            channel.queue_delete(f"{queue}.dead")
        print(
            f"{kind:8} {args.orders:,} orders queued: broker {before} -> {after} MiB"
            f" (+{after - before}); published in {took:.0f} s, one confirm at a time"
        )
        time.sleep(3)


if __name__ == "__main__":
    main()
