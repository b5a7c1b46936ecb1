"""CPU per request: one workload, and what each process spent on it.

    venv/dev/bin/python bench/cpu.py W1d                     # inventory direct
    venv/dev/bin/python bench/cpu.py W1 --rounds 3           # via the gateway
    venv/dev/bin/python bench/cpu.py W5 --profile out.txt    # + py-spy raw stacks
    venv/dev/bin/python bench/cpu.py bare publisher          # the floors' own cost

Starts bench/run.py's own stack (its databases, bench_queue, services on free
ports), runs wrk -t2 -c16 for --seconds, and prints the rate with the CPU time
(user + system, from /proc) per answered request of the service under load,
of the other services, of PostgreSQL's processes, and of the whole machine
(with how busy its cores were). For W5 billing is stopped and bench_queue
emptied after. "bare" is bench/bare_server.py under W1's requests, "publisher"
run.py's bare confirmed publisher (this process) for --seconds. --profile attaches py-spy (pip install py-spy) to the service
under load for 8 s; --gil keeps only the samples of the thread holding the
GIL (py-spy counts the last holder also while nobody holds it, e.g. during a
blocking call that released it).
"""

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import run

WORKLOADS = {  # (service under load, path, wrk script)
    "W1": ("gateway", "/", "get_random.lua"),
    "W1d": ("inventory", "/", "get_random.lua"),
    "W2": ("gateway", "/api/movies?title=needle", "get_fixed.lua"),
    "W3": ("gateway", "/api/movies", "get_fixed.lua"),
    "W4": ("gateway", "/api/movies", "post_movie.lua"),
    "W5": ("gateway", "/api/billing", "post_billing.lua"),
    "bare": ("bare", "/", "get_random.lua"),
    "publisher": ("publisher", None, None),
}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, system_only=False):
    """User + system CPU seconds of a process, all its threads (or system only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) * (not system_only) + int(fields[12])) / TICK


def switches(pid):
    """Context switches of the threads a process has now: blocking calls and
    hand-overs of the GIL (a thread that ends takes its count along)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):  # a thread ended meanwhile
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


def postgres_seconds():
    """CPU seconds of every PostgreSQL process now running."""
    out = subprocess.run(["pgrep", "-f", "postgres"], capture_output=True, text=True)
    total = 0.0
    for pid in out.stdout.split():
        with contextlib.suppress(OSError):  # ended meanwhile
            total += cpu_seconds(pid)
    return total


def machine_seconds():
    """(all, busy) CPU seconds of the machine since boot."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(ticks) / TICK, (sum(ticks) - ticks[3] - ticks[4]) / TICK


def sample(pids, target):
    return {
        "target": cpu_seconds(pids[target]),
        "target_system": cpu_seconds(pids[target], system_only=True),
        "others": sum(cpu_seconds(p) for s, p in pids.items() if s != target),
        "postgres": postgres_seconds(),
        "machine": machine_seconds(),
    }


def measure(args, pids, target, load):
    """One run of load(): its figures and the CPU microseconds per answer.

    Context switches are counted from 1 s in to 1 s before the end, while
    the server's threads live (a thread that ends takes its count along).
    """
    mid = {}

    def count_switches():
        time.sleep(1)
        mid["t0"], mid["n0"] = time.monotonic(), switches(pids[target])
        time.sleep(args.seconds - 2)
        mid["t1"], mid["n1"] = time.monotonic(), switches(pids[target])

    counter = threading.Thread(target=count_switches)
    before = sample(pids, target)
    counter.start()
    result = load()
    counter.join()
    after = sample(pids, target)
    answered = result["rate"] * args.seconds
    per = {
        k: (after[k] - before[k]) * 1e6 / answered
        for k in ("target", "target_system", "others")
    }
    per["postgres"] = (after["postgres"] - before["postgres"]) * 1e6 / answered
    total = after["machine"][0] - before["machine"][0]
    busy = after["machine"][1] - before["machine"][1]
    per["machine"] = busy * 1e6 / answered
    per["switches"] = (mid["n1"] - mid["n0"]) / (
        result["rate"] * (mid["t1"] - mid["t0"])
    )
    return result, per, busy / total


def profile(args, pid, url, script, env):
    """py-spy raw stacks of the service under load, while wrk runs."""
    load = subprocess.Popen(
        ["wrk", "-t2", "-c16", "-d12s", "-s", str(run.BENCH / script), url],
        env={**os.environ, "BENCH_LUA_DIR": str(run.BENCH), **env},
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1)
    spy = Path(sys.executable).parent / "py-spy"  # the venv's, if it has one
    cmd = [
        str(spy) if spy.exists() else "py-spy",
        "record",
        "--pid",
        str(pid),
        "--nonblocking",
    ]
    cmd += ["-d", "8", "-r", str(args.rate), "--format", "raw", "-o", args.profile]
    subprocess.run(cmd + ["--gil"] * args.gil, check=True, capture_output=True)
    load.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="+", choices=WORKLOADS)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", help="write py-spy's raw stacks here")
    parser.add_argument("--gil", action="store_true", help="GIL holder only")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples/s")
    args = parser.parse_args()
    stack = run.Stack(own=True)
    try:
        stack.up()
        low, high = run.seed_movies(stack.movies_db)
        env = {"BENCH_ID_MIN": str(low), "BENCH_ID_MAX": str(high)}
        env["BENCH_ORDER"] = run.ORDER.decode()
        for workload in args.workloads:
            one_workload(args, stack, workload, env)
    finally:
        stack.down()


def one_workload(args, stack, workload, env):
    """Warm up, then print --rounds lines of one workload (and --profile it)."""
    target, path, script = WORKLOADS[workload]
    if workload == "W5":
        stack.stop("billing")
        run.declare_queue(stack.mq, stack.queue)
    pids = stack.pids()
    bare = None
    if target == "bare":
        port = run.free_port()
        size = str(
            len(run.http_get(f"{stack.inventory}/api/movies/{env['BENCH_ID_MIN']}")[1])
        )
        bare = subprocess.Popen(
            [sys.executable, str(run.BENCH / "bare_server.py"), str(port), size, size]
        )
        pids = {**pids, "bare": bare.pid}
        url = f"http://127.0.0.1:{port}{path}"
        run.wait_http(url)
    elif target == "publisher":
        pids = {**pids, "publisher": os.getpid()}
        queue = f"{stack.queue}_floor"
    else:
        url = (stack.gateway if target == "gateway" else stack.inventory) + path
    try:
        if target == "publisher":

            def load():
                run.declare_queue(stack.mq, queue)
                rate = run.publish_confirmed(stack.mq, queue, 16, seconds=args.seconds)
                return {"rate": rate, "p50_ms": 0, "p99_ms": 0, "errors": 0}
        else:

            def load():
                return run.wrk(url, script, args.seconds, 16, env)

            run.wrk(url, script, 1, 16, env)  # warm pools and plans
        for _ in range(args.rounds):
            result, per, busy = measure(args, pids, target, load)
            print(
                f"{workload}: {result['rate']:,.0f} req/s, p50 "
                f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, errors {result['errors']}; CPU us per "
                f"request: {target} {per['target']:.0f} (kernel "
                f"{per['target_system']:.0f}; {per['switches']:.1f} context "
                "switches), other services "
                f"{per['others']:.0f}, PostgreSQL {per['postgres']:.0f}, machine "
                f"{per['machine']:.0f} ({busy:.0%} of its cores busy)",
                flush=True,
            )
        if args.profile and target != "publisher":
            profile(args, pids[target], url, script, env)
            print(f"py-spy stacks in {args.profile}")
    finally:
        if workload == "W5":
            run.declare_queue(stack.mq, stack.queue)  # purge what W5 queued
            stack.start("billing")
        if target == "publisher":
            run.delete_queue(stack.mq, queue)
        if bare is not None:
            bare.terminate()
            bare.wait()


if __name__ == "__main__":
    main()
