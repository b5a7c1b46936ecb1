"""Overload: 64 clients at once, then hundreds of idle and slow connections."""

import collections
import random
import selectors
import socket
import statistics
import threading
import time
import urllib.parse
import uuid

import helpers

# --- 64 clients at once ---

LOAD_CLIENTS = 64
LOAD_SECONDS = 30
LOAD_OPS = ("create", "get", "update", "delete", "search", "page", "missing", "order")
LOAD_WEIGHTS = (18, 18, 10, 8, 10, 8, 4, 24)


def _load_client(index, port, prefix, deadline, result):
    """One client's session: its own movies, its own orders, exact expectations."""
    rng = random.Random(index)
    client = helpers.Client(port)
    marker = f"{prefix}-c{index:02d}-"
    search = "/api/movies?title=" + urllib.parse.quote(marker)
    mine, orders, serial = {}, [], 0
    while time.monotonic() < deadline:
        op = rng.choices(LOAD_OPS, LOAD_WEIGHTS)[0]
        if op in ("get", "update", "delete") and not mine:
            op = "create"
        serial += 1
        movie_id = rng.choice(list(mine)) if op in ("get", "update", "delete") else 0
        if op == "create":
            body = {"title": f"{marker}{serial}", "description": f"d{serial}"}
            request = ("POST", "/api/movies", body)
        elif op == "get":
            request = ("GET", f"/api/movies/{movie_id}", None)
        elif op == "update":
            change = rng.choice(["title", "description"])
            value = f"{marker}{serial}u" if change == "title" else f"u{serial}"
            request = ("PUT", f"/api/movies/{movie_id}", {change: value})
        elif op == "delete":
            request = ("DELETE", f"/api/movies/{movie_id}", None)
        elif op == "search":
            request = ("GET", search, None)
        elif op == "page":
            request = ("GET", f"/api/movies?limit=5&offset={rng.randrange(50)}", None)
        elif op == "missing":
            request = ("GET", "/api/movies/2147483647", None)
        else:
            user = 4_000_000 + index * 100_000 + serial
            request = ("POST", "/api/billing", helpers.order(user))
        start = time.monotonic()
        try:
            status, answer = client.request(*request)
        except helpers.CLIENT_ERRORS as exc:
            result["errors"].append(f"{request[:2]}: {exc!r}")
            continue
        result["latencies"].append(time.monotonic() - start)
        result["statuses"][status] += 1
        if status >= 500:
            result["server_errors"].append((request[:2], status, answer))
            continue
        expected = {
            "create": 201,
            "get": 200,
            "update": 200,
            "delete": 200,
            "search": 200,
            "page": 200,
            "missing": 404,
            "order": 200,
        }[op]
        if status != expected:
            result["wrong"].append((request[:2], status, answer))
            continue
        if op == "create":
            if answer != {"id": answer["id"], **body}:
                result["wrong"].append((request[:2], status, answer))
            mine[answer["id"]] = answer
        elif op == "get" and answer != mine[movie_id]:
            result["wrong"].append((request[:2], answer, mine[movie_id]))
        elif op == "update":
            want = {**mine[movie_id], **request[2]}
            if answer != want:
                result["wrong"].append((request[:2], answer, want))
            mine[movie_id] = answer
        elif op == "delete":
            del mine[movie_id]
            result["deleted"] += 1
        elif op == "search" and answer != [mine[i] for i in sorted(mine)]:
            result["wrong"].append((request[:2], len(answer), len(mine)))
        elif op == "order":
            orders.append(request[2]["user_id"])
        result["created"] += op == "create"
    client.close()
    result["movies"] = mine
    result["orders"] = orders


def test_64_clients_for_30_seconds(procs, inventory, queue, orders_db, clean_movies):
    procs("billing", helpers.billing_env(queue))
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    prefix = f"load{uuid.uuid4().hex[:6]}"
    results = [
        {
            "errors": [],
            "server_errors": [],
            "wrong": [],
            "latencies": [],
            "statuses": collections.Counter(),
            "created": 0,
            "deleted": 0,
        }
        for _ in range(LOAD_CLIENTS)
    ]
    deadline = time.monotonic() + LOAD_SECONDS
    threads = [
        threading.Thread(
            target=_load_client, args=(i, gateway.port, prefix, deadline, results[i])
        )
        for i in range(LOAD_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    errors = [e for r in results for e in r["errors"]]
    server_errors = [e for r in results for e in r["server_errors"]]
    wrong = [e for r in results for e in r["wrong"]]
    assert not server_errors, server_errors[:10]
    assert not errors, errors[:10]
    assert not wrong, wrong[:10]
    expected = {i: m for r in results for i, m in r["movies"].items()}
    present = {
        i: {"id": i, "title": t, "description": d}
        for i, t, d in helpers.rows(
            clean_movies,
            "SELECT id, title, description FROM movies WHERE title LIKE %s",
            (f"{prefix}-%",),
        )
    }
    assert present == expected
    ok_orders = [u for r in results for u in r["orders"]]
    counts = helpers.wait_stored(set(ok_orders), 4_000_000, 4_000_000 + 100 * 100_000)
    assert sorted(counts) == sorted(ok_orders) and set(counts.values()) == {1}
    latencies = sorted(x for r in results for x in r["latencies"])
    statuses = sum((r["statuses"] for r in results), collections.Counter())
    created = sum(r["created"] for r in results)
    deleted = sum(r["deleted"] for r in results)
    helpers.figure(
        "load64",
        clients=LOAD_CLIENTS,
        seconds=LOAD_SECONDS,
        requests=len(latencies),
        rps=round(len(latencies) / LOAD_SECONDS),
        p50_ms=round(statistics.median(latencies) * 1000, 1),
        p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        max_ms=round(latencies[-1] * 1000),
        server_errors=0,
        connection_errors=0,
        movies_created=created,
        deleted=deleted,
        rows=len(present),
        orders_ok=len(ok_orders),
        orders_stored=len(counts),
        statuses="/".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
    )


# --- Idle and slow clients ---

IDLE_PER_SERVER = 200
MAX_CONNECTIONS = 512  # the services' cap on open client connections


def thread_count(pid):
    """Threads of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


def _slow_client(port, log):
    """Send a request's headers one byte a second; log (seconds, answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    start = time.monotonic()
    pending = b"GET /api/movies HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 40
    answer = b""
    try:
        for byte in pending:
            sock.sendall(bytes([byte]))
            readable, _, _ = select_one(sock, 1.0)
            if readable:
                break
        while chunk := sock.recv(4096):
            answer += chunk
    except OSError:
        pass
    log.append((time.monotonic() - start, answer))
    sock.close()


def select_one(sock, timeout):
    """Wait up to timeout for sock to be readable."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout)), None, None


def test_idle_and_slow_clients_do_not_starve_others(procs, inventory, queue):
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    servers = {"gateway": gateway, "inventory": inventory}
    baseline = {n: thread_count(s.proc.pid) for n, s in servers.items()}
    sel = selectors.DefaultSelector()
    idle = []  # [server name, seconds until closed, bytes received]
    opened = time.monotonic()
    for name, server in servers.items():
        for i in range(IDLE_PER_SERVER):
            # From 8 addresses: each stays under its cap of connections.
            source = (f"127.0.1.{i % 8 + 1}", 0)
            sock = socket.create_connection(("127.0.0.1", server.port), 5, source)
            idle.append([name, None, b""])
            sel.register(sock, selectors.EVENT_READ, idle[-1])
    slow = {name: [] for name in servers}
    slow_threads = [
        threading.Thread(target=_slow_client, args=(s.port, slow[n]), daemon=True)
        for n, s in servers.items()
    ]
    for thread in slow_threads:
        thread.start()
    latencies = {name: [] for name in servers}
    statuses = collections.Counter()
    peak = dict(baseline)
    keep_alive = {name: helpers.Client(s.port) for name, s in servers.items()}
    open_count = 2 * IDLE_PER_SERVER
    try:
        while open_count and time.monotonic() - opened < helpers.REQUEST_TIMEOUT + 8:
            for key, _ in sel.select(0.05):
                state = key.data
                try:
                    chunk = key.fileobj.recv(4096)
                except OSError:
                    chunk = b""
                state[2] += chunk
                if not chunk:
                    state[1] = time.monotonic() - opened
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    open_count -= 1
            for name, server in servers.items():
                for fresh in (True, False):
                    start = time.monotonic()
                    if fresh:
                        status = helpers.call(server.url, "GET", "/api/movies?limit=1")[
                            0
                        ]
                    else:
                        status = keep_alive[name].request("GET", "/api/movies?limit=1")[
                            0
                        ]
                    latencies[name].append(time.monotonic() - start)
                    statuses[status] += 1
                peak[name] = max(peak[name], thread_count(server.proc.pid))
            time.sleep(0.1)
    finally:
        leftover = [key.fileobj for key in sel.get_map().values()]
        for sock in leftover:
            sock.close()
        sel.close()
        for client in keep_alive.values():
            client.close()
    for thread in slow_threads:
        thread.join(helpers.REQUEST_TIMEOUT + 10)
    assert not leftover, f"{len(leftover)} idle connections still open"
    assert statuses == {200: sum(statuses.values())}, statuses
    for name, server in servers.items():
        worst = max(latencies[name])
        assert worst < 1.0, f"{name}: a request took {worst:.2f}s"
        assert peak[name] <= baseline[name] + IDLE_PER_SERVER + 8, (name, peak)
        assert peak[name] <= MAX_CONNECTIONS + baseline[name]
        seconds, answer = slow[name][0]
        assert helpers.REQUEST_TIMEOUT - 1 <= seconds <= helpers.REQUEST_TIMEOUT + 6, (
            name,
            seconds,
        )
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        helpers.wait_for(
            lambda s=server, b=baseline[name]: thread_count(s.proc.pid) <= b + 4,
            timeout=10,
            what=f"{name}'s threads to go back to {baseline[name]}",
        )
    closed_after = sorted(seconds for _, seconds, _ in idle)
    assert closed_after[0] >= helpers.REQUEST_TIMEOUT - 0.5, closed_after[:5]
    assert closed_after[-1] <= helpers.REQUEST_TIMEOUT + 6, closed_after[-5:]
    answers = {data for _, _, data in idle}
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    helpers.figure(
        "idle_slow",
        idle=f"{IDLE_PER_SERVER}x2",
        p50_ms=round(
            statistics.median(latencies["gateway"] + latencies["inventory"]) * 1000, 1
        ),
        max_ms=round(max(latencies["gateway"] + latencies["inventory"]) * 1000),
        probes=sum(statuses.values()),
        threads_gateway=f"{baseline['gateway']}->{peak['gateway']}",
        threads_inventory=f"{baseline['inventory']}->{peak['inventory']}",
        idle_closed_s=f"{closed_after[0]:.1f}..{closed_after[-1]:.1f}",
        slow_cut_s="/".join(f"{slow[n][0][0]:.1f}" for n in servers),
    )
