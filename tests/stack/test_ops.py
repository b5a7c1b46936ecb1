"""What an operator meets first: pinned versions and a direct launch that explains itself."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["gateway", "inventory", "billing"]


def pinned(path):
    """{name: Requirement} of a requirements file, following '-r other.txt'."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            found.update(pinned(path.parent / line[2:].strip()))
        elif line:
            req = Requirement(line)
            found[canonicalize_name(req.name)] = req
    return found


def needed(req, environment):
    """Every distribution req brings in on this platform, itself included."""
    names, todo = set(), [(req, frozenset(req.extras))]
    while todo:
        current, extras = todo.pop()
        name = canonicalize_name(current.name)
        if name in names:
            continue
        names.add(name)
        for text in metadata.requires(current.name) or []:
            dep = Requirement(text)
            wanted = [{**environment, "extra": e} for e in extras or [""]]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in wanted):
                todo.append((dep, frozenset(dep.extras)))
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_requirements_pin_every_package_the_service_loads(service):
    reqs = pinned(ROOT / f"requirements-{service}.txt")
    environment = default_environment()
    for req in list(reqs.values()):
        for name in needed(req, environment):
            assert name in reqs, f"{name} (from {req.name}) is not pinned"
            assert str(reqs[name].specifier).startswith("=="), reqs[name]
            assert reqs[name].specifier.contains(metadata.version(name)), (
                f"{name}: installed {metadata.version(name)}, pinned {reqs[name]}"
            )


def test_python_is_a_supported_version():
    """README's 'Python 3.11' is the version these tests run on."""
    assert sys.version_info[:2] == (3, 11)
    assert "Python 3.11" in (ROOT / "README.md").read_text()


def run_service(service, env):
    """Start a service as `python <service>.py` would; return (code, stderr)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / f"{service}.py")],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stderr


# 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine.
@pytest.mark.parametrize(
    ("service", "variable"),
    [("gateway", "GATEWAY_HOST"), ("inventory", "INVENTORY_HOST")],
)
def test_an_address_not_on_this_machine_is_one_line_naming_the_fix(service, variable):
    # Everything else on loopback: the test sends nothing off this machine.
    local = {"INVENTORY_HOST": "127.0.0.1", "RABBITMQ_HOST": "127.0.0.1"}
    for _ in range(5):  # a traceback at exit came from a race: try it a few times
        code, stderr = run_service(service, {**local, variable: "192.0.2.1"})
        assert code == 1
        assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) >= 1
    last = lines[-1]
    assert last.startswith(f"{service}: {variable}=192.0.2.1"), last
    assert f"{variable}=127.0.0.1" in last, last


def test_bench_chart_is_svg_with_each_row_beside_its_floor():
    import xml.etree.ElementTree as ET

    sys.path.insert(0, str(ROOT / "bench"))
    import run

    runs = {row[0]: {"rate": 1000.0} for row in run.ROWS}
    runs.update({row[2]: {"rate": 4000.0} for row in run.ROWS if row[2] not in runs})
    runs["W1d"] = {"rate": 500.0}  # a row above its floor still fits
    root = ET.fromstring(run.svg(runs, "a <caption> & more"))
    ns = "{http://www.w3.org/2000/svg}"
    bars = root.findall(f"{ns}rect")[1:]  # after the white background
    assert len(bars) == 2 * len(run.ROWS)
    width = float(root.get("width"))
    for bar in bars:
        assert 0 < float(bar.get("x")) + float(bar.get("width")) <= width
    texts = " ".join(t.text for t in root.iter(f"{ns}text"))
    assert "W1: GET /api/movies/<id> via the gateway" in texts
    assert "(200%)" in texts  # W1 at 1,000 against W1d at 500
    assert "usual" not in texts and "MET" not in texts


def test_bench_own_stack_logs_the_services_in_as_guest():
    # The services' broker users may only use billing_queue, not bench_queue:
    # with them, billing could not drain the benchmark's backlog.
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    env = run.Stack(own=True).env
    assert env["RABBITMQ_QUEUE"] != "billing_queue"
    for user in ("RABBITMQ_GATEWAY", "RABBITMQ_BILLING"):
        assert env[f"{user}_USER"] == env[f"{user}_PASSWORD"] == "guest"


def test_bench_counts_the_context_switches_of_every_thread():
    # bench/cpu.py's switches per request: a thread that sleeps gives up the
    # CPU each time, and a thread other than the main one counts too.
    import threading
    import time

    sys.path.insert(0, str(ROOT / "bench"))
    import cpu

    go, slept, end = threading.Event(), threading.Event(), threading.Event()

    def sleeper():
        go.wait()
        for _ in range(50):
            time.sleep(0.001)
        slept.set()
        end.wait()

    thread = threading.Thread(target=sleeper)
    thread.start()
    before = cpu.switches(os.getpid())
    go.set()
    slept.wait()
    during = cpu.switches(os.getpid())
    end.set()
    thread.join()
    assert during - before >= 50
    # Why bench/cpu.py counts while the load runs: an ended thread's count is gone.
    assert cpu.switches(os.getpid()) < during - 40
