"""Two inventories behind the gateway: its own list (INVENTORY_HOSTS) against
HAProxy from Debian in front of them, measured in one run.

    sudo venv/dev/bin/python bench/inventories.py [--seconds 5] [--repeat 3]

Starts two inventories (127.0.0.2 and 127.0.0.3, one port) on bench_movies,
three gateways (the list; one inventory through HAProxy, roundrobin with a
/health check every second; one inventory alone, the floor) and HAProxy, then
runs wrk (GET /api/movies/<id>, 16 connections) against each in turn, repeat
times, and prints the median rate and latencies of each, and how long each
took to stop sending requests to an inventory killed under load (SIGKILL).
Needs wrk and haproxy (apt-get install wrk haproxy).
"""

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402  (bench/run.py: databases, ports, wrk)

ADDRESSES = ("127.0.0.2", "127.0.0.3")
HAPROXY = """global
    maxconn 4096
defaults
    mode http
    timeout connect 3s
    timeout client 30s
    timeout server 10s
    option http-keep-alive
listen inventories
    bind 127.0.0.1:{port}
    balance roundrobin
    option httpchk GET /health
    server a 127.0.0.2:{inventory} check inter 1s fall 1 rise 1
    server b 127.0.0.3:{inventory} check inter 1s fall 1 rise 1
"""


def start(service, env, log):
    python = run.REPO / "venv" / service / "bin" / "python"
    cmd = [
        str(python if python.exists() else sys.executable),
        str(run.REPO / f"{service}.py"),
    ]
    return subprocess.Popen(
        cmd, cwd=run.REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def wait_listening(address, port):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(address, port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{address}:{port} does not answer")


def failover(url, victim):
    """Seconds from SIGKILL of victim until 20 requests in a row succeed, and
    how many failed meanwhile (one client, keep-alive)."""
    host, port = url.removeprefix("http://").split(":")
    failed, streak, killed = 0, 0, None
    conn = None
    started = time.monotonic()
    while time.monotonic() - started < 30:
        if killed is None and time.monotonic() - started > 1:
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection(host, int(port), timeout=15)
            conn.request("GET", "/api/movies?limit=1")
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except OSError:
            conn, ok = None, False
        if killed is not None:
            streak = streak + 1 if ok else 0
            failed += not ok
            if streak >= 20:
                return time.monotonic() - killed, failed
        time.sleep(0.01)
    return None, failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = {**run.dotenv_values(run.REPO / ".env"), **os.environ}
    env.update(INVENTORY_DB_NAME="bench_movies", INVENTORY_DB_HOST="127.0.0.1")
    env.update(RABBITMQ_QUEUE="bench_queue", MALLOC_ARENA_MAX="2", LOG_LEVEL="WARNING")
    for user in ("RABBITMQ_GATEWAY", "RABBITMQ_BILLING"):
        env.update({f"{user}_USER": run.GUEST, f"{user}_PASSWORD": run.GUEST})
    env.update(RABBITMQ_HOST="127.0.0.1", GATEWAY_HOST="127.0.0.1")
    login = [env[f"INVENTORY_DB_{k}"] for k in ("USER", "PASSWORD")]
    run.ensure_database(
        "bench_movies", *login, run.REPO / "sql" / "inventory_schema.sql"
    )
    low, high = run.seed_movies("bench_movies")
    inventory_port, haproxy_port = run.free_port(), run.free_port()
    procs, logs = [], tempfile.TemporaryFile()  # noqa: SIM115 (closed at exit)
    gateways = {}
    try:
        inventories = []
        for address in ADDRESSES:
            e = {
                **env,
                "INVENTORY_HOST": address,
                "INVENTORY_PORT": str(inventory_port),
            }
            inventories.append(start("inventory", e, logs))
        procs += inventories
        for address in ADDRESSES:
            wait_listening(address, inventory_port)
        config = Path(tempfile.mkdtemp()) / "haproxy.cfg"
        config.write_text(HAPROXY.format(port=haproxy_port, inventory=inventory_port))
        haproxy = ["haproxy", "-db", "-f", str(config)]
        procs.append(subprocess.Popen(haproxy, stdout=logs, stderr=logs))
        setups = {
            "gateway's list (INVENTORY_HOSTS)": {
                "INVENTORY_HOSTS": ",".join(ADDRESSES),
                "INVENTORY_PORT": str(inventory_port),
            },
            "HAProxy (roundrobin, check 1 s)": {
                "INVENTORY_HOST": "127.0.0.1",
                "INVENTORY_PORT": str(haproxy_port),
            },
            "one inventory, no balancing": {
                "INVENTORY_HOST": ADDRESSES[0],
                "INVENTORY_PORT": str(inventory_port),
            },
        }
        for name, extra in setups.items():
            port = run.free_port()
            e = {**env, "INVENTORY_HOSTS": "", **extra, "GATEWAY_PORT": str(port)}
            procs.append(start("gateway", e, logs))
            gateways[name] = f"http://127.0.0.1:{port}"
        for url in gateways.values():
            run.wait_http(url + f"/api/movies/{low}")
        ids = {"BENCH_ID_MIN": str(low), "BENCH_ID_MAX": str(high)}
        runs = {name: [] for name in gateways}
        for _ in range(args.repeat):
            for name, url in gateways.items():
                runs[name].append(
                    run.wrk(
                        url + "/api/movies/", "get_random.lua", args.seconds, 16, ids
                    )
                )
        print(
            f"bench/inventories.py, {time.strftime('%Y-%m-%d %H:%M')}, wrk -c16 GET /api/movies/<id>, {args.seconds} s runs, median of {args.repeat}"
        )
        floor = run.median(runs["one inventory, no balancing"])["rate"]
        for name in gateways:
            m = run.median(runs[name])
            print(
                f"  {name:36} {m['rate']:7,.0f}/s  p50 {m['p50_ms']:5.2f} ms  p99 {m['p99_ms']:6.2f} ms  errors {m['errors']}  {m['rate'] / floor:4.0%} of one  runs {m['rates']}"
            )
        # Failover: kill one inventory under a client, through each balancer;
        # the inventory is started again in between.
        for name in list(gateways)[:2]:
            victim = inventories[0]
            took, failed = failover(gateways[name], victim)
            victim.wait()
            e = {
                **env,
                "INVENTORY_HOST": ADDRESSES[0],
                "INVENTORY_PORT": str(inventory_port),
            }
            inventories[0] = start("inventory", e, logs)
            procs.append(inventories[0])
            wait_listening(ADDRESSES[0], inventory_port)
            time.sleep(2)  # both balancers take it back
            said = "never" if took is None else f"{took:.1f} s"
            print(
                f"  {name:36} inventory killed: 20 answers in a row again after {said}, {failed} failed meanwhile"
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
