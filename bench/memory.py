"""Where a service's memory goes: the RSS of fresh processes, variant by variant.

    venv/dev/bin/python bench/memory.py [--port 5432] [--repeat 3]

Each variant runs in a new interpreter: it imports what the service imports,
opens the service's database connections as billing's role from .env (a SCRAM
password login over 127.0.0.1, as on the VMs), runs one query on each and
prints VmRSS, split into anonymous and file-backed memory. The variants are
the choices behind the services' memory (bench/HISTORY.md, "Memory"): Python's
ssl loaded or kept out, psycopg's binary or Python layer, and libpq's sslmode
and gssencmode. Point --port at a PostgreSQL with ssl = on (Debian's default
on a VM) to see what TLS on the loopback link costs.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from dotenv import dotenv_values

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
if spec["impl"]:
    os.environ["PSYCOPG_IMPL"] = spec["impl"]
if spec["no_ssl"]:
    sys.modules["ssl"] = None
for name in spec["imports"]:
    __import__(name)
import psycopg
conns = [psycopg.connect(**spec["conninfo"]) for _ in range(spec["connections"])]
for conn in conns:
    conn.execute("SELECT 1").fetchone()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}))
"""

INVENTORY = ["http.server", "psycopg", "psycopg_pool", "dotenv"]
BILLING = ["pika", "psycopg", "dotenv"]
DEFAULTS = {"sslmode": "prefer", "gssencmode": "prefer"}  # libpq's own
AS_COMMITTED = {"sslmode": "disable", "gssencmode": "disable"}

# (label, imports, connections, PSYCOPG_IMPL, keep ssl out, libpq options)
VARIANTS = [
    ("inventory, before", INVENTORY, 4, "binary", False, DEFAULTS),
    ("inventory, ssl kept out", INVENTORY, 4, "binary", True, DEFAULTS),
    ("inventory, as committed", INVENTORY, 4, "binary", True, AS_COMMITTED),
    ("billing, before", BILLING, 1, "binary", False, DEFAULTS),
    ("billing, psycopg Python layer", BILLING, 1, "python", False, DEFAULTS),
    ("billing, as committed", BILLING, 1, "python", False, AS_COMMITTED),
]


def measure(spec):
    """VmRSS, RssAnon, RssFile in KiB of one child process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env = dotenv_values(REPO / ".env")
    parser.add_argument("--port", default=env["BILLING_DB_PORT"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = {
        "host": "127.0.0.1",
        "port": args.port,
        "dbname": env["BILLING_DB_NAME"],
        "user": env["BILLING_DB_USER"],
        "password": env["BILLING_DB_PASSWORD"],
    }
    print(f"median of {args.repeat} processes each, MiB (target <= 40 per service)")
    print(f"{'variant':32s} {'VmRSS':>6s} {'anon':>6s} {'file':>6s}  libpq options")
    for label, imports, connections, impl, no_ssl, options in VARIANTS:
        spec = {
            "imports": imports,
            "connections": connections,
            "impl": impl,
            "no_ssl": no_ssl,
            "conninfo": {**base, **options},
        }
        runs = [measure(spec) for _ in range(args.repeat)]
        mib = {k: statistics.median(r[k] for r in runs) / 1024 for k in runs[0]}
        print(
            f"{label:32s} {mib['VmRSS']:6.1f} {mib['RssAnon']:6.1f} "
            f"{mib['RssFile']:6.1f}  "
            + " ".join(f"{k}={v}" for k, v in options.items())
        )


if __name__ == "__main__":
    main()
