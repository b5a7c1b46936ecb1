"""Code two or three services need lives in marked blocks, written by a tool.

A block starts with `# --- shared: NAME (identical in a.py, b.py) ---` and ends
with `# --- end of shared: NAME ---`. The first file named is the source;
scripts/shared_blocks.py copies it into the others, and its --check mode (run
here) fails naming the fix when a copy differs.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "scripts" / "shared_blocks.py"
_spec = importlib.util.spec_from_file_location("shared_blocks", TOOL)
shared_blocks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shared_blocks)


def block_text(text, name):
    """The text of block name in text."""
    start, end = shared_blocks.blocks(text)[name][1]
    return text[start:end]


def test_every_copy_is_its_source_as_the_tool_checks():
    done = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_the_services_share_their_logging_launch_http_and_amqp_code():
    gateway = (ROOT / "gateway.py").read_text()
    found = shared_blocks.blocks(gateway)
    assert {"logging", "bind", "http", "amqp", "order", "config"} <= set(found)
    assert "def load_queries(" in block_text((ROOT / "billing.py").read_text(), "sql")
    assert "def setup_logging(" in block_text(gateway, "logging")
    assert found["http"][0] == ("gateway.py", "inventory.py")
    http = block_text(gateway, "http")
    for name in ("class ApiError", "class Server", "class Handler", "class Router"):
        assert name in http, name
    assert set(found["amqp"][0]) == {"gateway.py", "billing.py"}
    assert "class Backoff" in block_text(gateway, "amqp")
    order = block_text(gateway, "order")
    for name in ("def check_order(", "def check_amount(", "def check_message_id("):
        assert name in order, name


BLOCK = (
    "# --- shared: a (identical in a.py, b.py) ---\n"
    "def f():\n    return x\n# --- end of shared: a ---\n"
)


def test_the_tool_copies_a_block_from_its_source():
    stale = "top\n" + BLOCK.replace("return x", "return y") + "bottom\n"
    synced, problems = shared_blocks.sync({"a.py": BLOCK, "b.py": stale})
    assert problems == ["a: b.py differs from a.py"]
    assert synced["b.py"] == "top\n" + BLOCK + "bottom\n"
    assert shared_blocks.sync(synced)[1] == []


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda t: "", "a: missing from b.py"),
        (lambda t: t.replace("end of shared: a", "end: a"), "no end marker"),
        (lambda t: t + t, "appears twice"),
    ],
)
def test_broken_blocks_are_named(change, problem):
    try:
        problems = shared_blocks.sync({"a.py": BLOCK, "b.py": change(BLOCK)})[1]
    except ValueError as exc:
        problems = [str(exc)]
    assert any(problem in p for p in problems), problems
