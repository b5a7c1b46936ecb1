"""Code two or three services need lives in marked blocks kept byte-identical.

A block starts with `# --- shared: NAME (identical in a.py, b.py) ---` and ends
with `# --- end of shared: NAME ---`; every file it names must hold the same text.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("gateway.py", "inventory.py", "billing.py")
_START = re.compile(r"^# --- shared: (\S+) \(identical in ([^)]+)\) ---$", re.M)


def shared_blocks(text):
    """{name: (files named in its header, its text)} of each block in text."""
    blocks = {}
    for match in _START.finditer(text):
        name = match.group(1)
        end = text.find(f"\n# --- end of shared: {name} ---", match.end())
        assert end != -1, f"shared block {name} has no end marker"
        assert name not in blocks, f"shared block {name} appears twice"
        files = tuple(f.strip() for f in match.group(2).split(","))
        blocks[name] = (files, text[match.start() : end])
    return blocks


def drift(texts):
    """Problems with the shared blocks of {file: text}: missing or different copies."""
    problems, seen = [], {}
    for path, text in texts.items():
        for name, (files, block) in shared_blocks(text).items():
            seen.setdefault(name, (files, {}))[1][path] = block
    for name, (files, copies) in seen.items():
        if len(files) < 2:
            problems.append(f"{name}: a shared block must name two files or more")
        for path in files:
            if path not in copies:
                problems.append(f"{name}: missing from {path}")
        if len(set(copies.values())) > 1:
            problems.append(f"{name}: differs between {', '.join(sorted(copies))}")
    return problems


def test_every_shared_block_is_identical_wherever_it_is_named():
    texts = {name: (ROOT / name).read_text() for name in SERVICES}
    assert drift(texts) == []


def test_the_services_share_their_logging_launch_http_and_amqp_code():
    gateway = shared_blocks((ROOT / "gateway.py").read_text())
    assert {"logging", "bind", "http", "amqp"} <= set(gateway)
    assert "def setup_logging(" in gateway["logging"][1]
    assert gateway["http"][0] == ("gateway.py", "inventory.py")
    for name in ("class ApiError", "class Server", "class Handler", "class Router"):
        assert name in gateway["http"][1], name
    files, amqp = gateway["amqp"]
    assert set(files) == {"gateway.py", "billing.py"}
    assert "class Backoff" in amqp and "def queue_arguments(" in amqp
    files, order = gateway["order"]
    assert set(files) == {"gateway.py", "billing.py"}
    assert "MAX_AMOUNT =" in order and "ORDER_FIELDS =" in order


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda t: t.replace("return x", "return y"), "a: differs between a.py, b.py"),
        (lambda t: "", "a: missing from b.py"),
        (lambda t: t.replace("end of shared: a", "end: a"), "no end marker"),
    ],
)
def test_drift_is_found(change, problem):
    block = (
        "# --- shared: a (identical in a.py, b.py) ---\n"
        "def f():\n    return x\n# --- end of shared: a ---\n"
    )
    try:
        problems = drift({"a.py": block, "b.py": change(block)})
    except AssertionError as exc:
        problems = [str(exc)]
    assert any(problem in p for p in problems), problems
