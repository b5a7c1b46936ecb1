"""A seeded, time-bounded raw-HTTP fuzzer against gateway and inventory.

Each case is one connection carrying one or more pipelined requests built at
random: request lines, header sets (some malformed), framings (a length, a
wrong or doubled length, chunked with odd sizes, extensions and trailers, both,
none), bodies, Expect, HTTP/1.0 and truncation. The client half-closes after
sending, so every answer is due at once. Checks:

- never a 5xx (but 505 for an HTTP/2+ request line), every answer well framed;
- no answer later than the request deadline (no hang);
- the server still answers a probe afterwards, and has not exited;
- behind the gateway, a recording fake inventory gets exactly the requests the
  gateway should accept, with the same method, target and body and one exact
  Content-Length; nothing ambiguous, incomplete or smuggled is forwarded, and
  the client gets the fake's answer unchanged.

FUZZ_SEED (default 1313) and FUZZ_SECONDS (default 10, per target) override
the seed and the time spent; a failure names the case to replay.
"""

import concurrent.futures
import contextlib
import json
import os
import random
import re
import socket
import time

import helpers
import pytest
from rawhttp import Client
from rawhttp import FakeUpstream

SEED = int(os.environ.get("FUZZ_SEED", "1313"))
SECONDS = float(os.environ.get("FUZZ_SECONDS", "10"))
DEADLINE = 10 + 5  # the services' request deadline, plus a margin
WORKERS = 4
# What shows that a server still works after a batch of cases.
PROBES = {"gateway": "/health", "inventory": "/api/movies?limit=1"}
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 method syntax

METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "FOO"]
ODD_METHODS = ["get", "G\x00T", "GE T", "", "A" * 300, "PO\rST", "\xc9T"]
TARGETS = [
    "/api/movies",
    "/api/movies/",
    "/api/movies/1",
    "/api/movies/999999",
    "/api/movies/abc",
    "/api/movies?limit=2",
    "/api/movies?title=Bulk%201&offset=1",
    "/api/movies/1/x",
    "/api/movies?title=%ff",
]
OTHER_TARGETS = ["/health", "/api/billing", "/nope", "*", "http://x/api/movies", "/"]
ODD_TARGETS = ["/api/movies/\x01", "/api/movies?x=\x7f", "/api/movies/é", "/%"]
VERSIONS = ["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/1"]
ODD_HEADERS = [
    b"X-No-Colon\r\n",
    b"X-Space : 1\r\n",
    b"X-Fold: a\r\n b\r\n",
    b"X-Bare: a\rb\r\n",
    b"X-Nul: a\x00b\r\n",
    b" X-Leading: 1\r\n",
    b": empty-name\r\n",
    b"X-Long: " + b"l" * 70_000 + b"\r\n",
    b"Transfer-Encoding: gzip\r\n",
]
BODIES = [
    b"",
    b'{"title": "fuzz"}',
    b'{"title": "fuzz", "description": "d"}',
    b'{"user_id": 1, "number_of_items": 1, "total_amount": 1e99999999999999999999}',
    b'{"user_id": "7", "number_of_items": "1", "total_amount": "2.50"}',
    b"{",
    b"0\r\n\r\n",
    b"GET /api/movies HTTP/1.1\r\nX-Fuzz-Id: smuggled\r\n\r\n",
    bytes(range(256)),
]


class Request:
    """One generated request: its bytes and what a strict server must see."""

    def __init__(self, fid):
        self.fid, self.data = fid, b""
        self.method, self.target, self.version = "GET", "/", "HTTP/1.1"
        self.body = b""
        self.clean = True  # one unambiguous reading, as RFC 9112 frames it
        self.end = 0  # where its head and body end in data (then the next request)
        self.last = False  # leaves bytes the server reads as a next request


def random_request(rng, fid):
    """A request, mostly well formed, with one or two oddities at times."""
    req = Request(fid)
    odd = rng.random()
    req.method = rng.choice(METHODS) if odd > 0.05 else rng.choice(ODD_METHODS)
    pool = TARGETS * 3 + OTHER_TARGETS + (ODD_TARGETS if odd < 0.15 else [])
    req.target = rng.choice(pool)
    req.version = rng.choice(VERSIONS)
    if not TOKEN.fullmatch(req.method) or re.search("[\x00-\x20\x7f]", req.target):
        req.clean = False
    if req.version != "HTTP/1.1" and req.version != "HTTP/1.0":
        req.clean = False
    line = f"{req.method} {req.target} {req.version}\r\n".encode()
    headers = [b"X-Fuzz-Id: %s\r\n" % fid.encode()]
    if rng.random() < 0.9:
        headers.append(b"Host: x\r\n")
    if rng.random() < 0.7:
        headers.append(b"Content-Type: application/json\r\n")
    if rng.random() < 0.2:
        headers.append(b"Expect: 100-continue\r\n")
    if rng.random() < 0.2:
        headers.append(b"X-Text: caf\xe9 \t%d\r\n" % rng.randrange(10**6))
    if rng.random() < 0.1:
        headers.append(
            b"Connection: " + rng.choice([b"close", b"keep-alive"]) + b"\r\n"
        )
    if rng.random() < 0.15:
        headers.append(rng.choice(ODD_HEADERS))
        req.clean = False
    req.body = rng.choice(BODIES)
    if rng.random() < 0.1:
        req.body = rng.randbytes(rng.randrange(1, 3000))
    framing = rng.choices(
        [
            "length",
            "same-twice",
            "two",
            "bad",
            "short",
            "long",
            "chunked",
            "both",
            "none",
        ],
        [60, 5, 5, 5, 3, 3, 8, 4, 7],
    )[0]
    length = len(req.body)
    tail = b""
    if framing == "length":
        headers.append(b"Content-Length: %d\r\n" % length)
    elif framing == "same-twice":
        headers.append(
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (length, length)
        )
    elif framing == "two":
        headers.append(
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (length, length + 1)
        )
        req.clean = False
    elif framing == "bad":
        value = rng.choice([b"+%d", b"-%d", b"%d %d", b"0x%x", b"", b"%d,%d1"])
        value = value % ((length,) * value.count(b"%")) if b"%" in value else value
        if rng.random() < 0.2:
            value = b"1" * 5000
        headers.append(b"Content-Length: " + value + b"\r\n")
        req.clean = False
    elif framing in ("short", "long"):
        if b"HTTP/1.1" in req.body:
            req.body = BODIES[1]  # a request after a short length is no smuggling
            length = len(req.body)
        cut = rng.randrange(0, length + 1) if framing == "short" else length + 5
        headers.append(b"Content-Length: %d\r\n" % cut)
        if framing == "short":
            tail, req.body = req.body[cut:], req.body[:cut]
        else:
            req.clean = False  # never complete: the client half-closes
        req.last = True
    elif framing in ("chunked", "both"):
        te = rng.choice([b"chunked", b"CHUNKED"])
        headers.append(b"Transfer-Encoding: " + te + b"\r\n")
        if framing == "both":
            headers.append(b"Content-Length: %d\r\n" % length)
        req.body, chunked = b"", b""
        data = BODIES[1]
        while data:
            size = rng.randrange(1, 8)
            ext = rng.choice([b"", b";a=b", b";" + b"x" * 100])
            chunked += b"%0*x%s\r\n%s\r\n" % (
                rng.randrange(1, 6),
                size,
                ext,
                data[:size],
            )
            data = data[size:]
        chunked += b"0\r\n" + rng.choice([b"", b"X-Trailer: 1\r\n"]) + b"\r\n"
        tail = chunked
        req.clean, req.last = False, True
    else:  # none: a body without a length is the start of the next request
        tail, req.body = req.body.replace(b"HTTP/1.1", b"HTTP/x"), b""
        req.last = bool(tail)
    rng.shuffle(headers)
    head = line + b"".join(headers) + b"\r\n"
    req.data = head + req.body + tail
    req.end = len(head) + len(req.body)
    return req


def random_case(target, index):
    """One connection's worth of requests, and where the bytes stop."""
    rng = random.Random(f"{SEED}-{target}-{index}")
    requests = []
    for n in range(rng.choice([1, 1, 2, 3, 5])):
        req = random_request(rng, f"{index}-{n}")
        requests.append(req)
        if req.last:
            break
    data = b"".join(r.data for r in requests)
    cut = len(data)
    if rng.random() < 0.15:
        cut = rng.randrange(0, len(data))  # truncated: the client gives up
    return requests, data[:cut]


def run_case(port, target, index, upstream_answers=None, within=DEADLINE):
    """Send one case and check every answer; return a list of problems."""
    requests, data = random_case(target, index)
    problems = []
    start = time.monotonic()
    client = Client(port, timeout=DEADLINE)
    try:
        client.send(data)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        offset = 0
        for req in requests:
            complete = offset + req.end <= len(data)
            offset += len(req.data)
            try:
                response = client.response(req.method)
            except (ValueError, TimeoutError) as exc:
                problems.append((index, req.fid, f"unreadable answer: {exc!r}"))
                break
            if response is None:
                break
            version_2 = req.version.startswith("HTTP/2")
            if response.status >= 500 and not (response.status == 505 and version_2):
                problems.append((index, req.fid, "server error", response))
            fid = response.header("x-fuzz-id")
            if upstream_answers is not None and fid is not None:
                if fid != req.fid or not req.clean or not complete:
                    problems.append((index, req.fid, "forwarded", fid, req.data[:300]))
                elif req.method != "HEAD" and response.body != upstream_answers(fid):
                    problems.append((index, fid, "answer changed", response))
            if response.header("connection") == "close":
                break
    except OSError as exc:
        problems.append((index, "connection", repr(exc)))
    finally:
        client.close()
    if time.monotonic() - start > within:
        problems.append((index, "too slow", time.monotonic() - start, data[:300]))
    return problems, requests, data


def fuzz(port, target, probe, upstream_answers=None, check=None, within=DEADLINE):
    """Run cases for SECONDS on WORKERS connections; return (cases, problems)."""
    problems, cases, index = [], 0, 0
    stop_at = time.monotonic() + SECONDS
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        while time.monotonic() < stop_at and len(problems) < 20:
            batch = [
                pool.submit(run_case, port, target, index + i, upstream_answers, within)
                for i in range(WORKERS * 8)
            ]
            index += len(batch)
            for future in batch:
                found, requests, data = future.result()
                cases += 1
                problems += found
                if check:
                    problems += check(requests, data)
            status = probe()
            if status != 200:
                problems.append(("probe after case", index, status))
    return cases, problems


def report(target, cases, problems):
    print(f"FIGURE fuzz.{target}: seed={SEED} seconds={SECONDS} cases={cases}")
    assert not problems, "\n".join(map(repr, problems[:20]))


def test_fuzz(server, inventory, clean_movies):
    def probe():
        return helpers.call(server.url, "GET", PROBES[server.name])[0]

    cases, problems = fuzz(server.port, server.name, probe)
    assert server.proc.poll() is None, server.tail()
    assert inventory.proc.poll() is None, inventory.tail()
    report(server.name, cases, problems)


def upstream_body(fid):
    """The fake inventory's answer body for a request id."""
    return json.dumps({"id": fid, "pad": "p" * (len(fid) * 37 % 300)}).encode()


def fake_answer(request):
    """Answer in one of four framings, chosen by the request's id."""
    fid = (request.values("x-fuzz-id") or ["none"])[0]
    body = upstream_body(fid) if request.method != "HEAD" else b""
    kind = sum(fid.encode()) % 4
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Fuzz-Id: %s\r\n" % (
        fid.encode()
    )
    if kind == 0:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if kind == 1 and not body:
        return head + b"Transfer-Encoding: chunked\r\n\r\n"
    if kind == 1:
        chunks = b"".join(
            b"%x;e=1\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
            for i in range(0, len(body), 7)
        )
        return (
            head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nT: 1\r\n\r\n"
        )
    if kind == 2:
        return (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            + head
            + b"Content-Length: %d\r\n\r\n" % (len(body))
            + body
        )
    return head + b"Connection: close\r\n\r\n" + body, True


@pytest.fixture
def recorded_gateway(queue_name):
    """A gateway in front of a recording fake inventory: (gateway, upstream)."""
    upstream = FakeUpstream(fake_answer)
    port = helpers.free_port()
    env = helpers.gateway_env(port, upstream.port, queue_name)
    env["INVENTORY_TIMEOUT"] = "3"
    service = helpers.Service("gateway", env, port).start()
    yield service, upstream
    service.stop()
    upstream.close()


def percent_encoded(target):
    """The target as the gateway forwards it: raw non-ASCII bytes encoded."""
    return "".join(
        c if ord(c) < 128 else "".join(f"%{b:02X}" for b in c.encode()) for c in target
    )


def test_fuzz_gateway_forwards_exactly_what_it_accepts(recorded_gateway):
    gateway, upstream = recorded_gateway
    sent = {}

    def check(requests, data):
        for req in requests:
            sent[req.fid] = req
        return []

    def probe():
        return helpers.call(
            gateway.url, "GET", "/api/movies/probe", headers={"X-Fuzz-Id": "p"}
        )[0]

    # The fake answers at once: any stall is the gateway's (its timeout is 3 s).
    cases, problems = fuzz(
        gateway.port, "recorded", probe, upstream_body, check, within=2
    )
    problems += upstream.problems
    forwarded = 0
    for got in upstream.requests:
        if not got.values("x-forwarded-for"):
            continue  # the gateway's own /health check
        fid = ",".join(got.values("x-fuzz-id"))
        if fid == "p" and got.target == "/api/movies/probe":
            continue
        req = sent.get(fid)
        if req is None:
            problems.append(("forwarded a request nobody sent", got))
            continue
        forwarded += 1
        expected = (req.method, percent_encoded(req.target), req.body)
        if (got.method, got.target, got.body) != expected or not req.clean:
            problems.append(("forwarded differently", expected, got))
        if got.values("content-length") not in ([], [str(len(got.body))]):
            problems.append(("length", got))
        if len(got.values("x-fuzz-id")) != 1:
            problems.append(("id header", got))
    print(f"FIGURE fuzz.recorded: forwarded={forwarded} of sent={len(sent)}")
    assert forwarded > 50, "too few requests reached the fake inventory"
    report("recorded", cases, problems)
