"""Faults between the three hosts of scripts/hosts.sh, for the host tests.

A Fault is started by start() and undone by heal(); `injected(fault)` heals
also when the test fails, and heal_everything() undoes every kind of fault on
every host (a fixture's last word). Partitions are nftables drops in the
hosts' own network namespaces; pauses and crashes are signals sent inside a
host. This kernel has no netem: no delay and no loss rate, only drops.
"""

import contextlib
import re
import subprocess
import time

from helpers_hosts import BILLING_VM
from helpers_hosts import BILLING_VMS
from helpers_hosts import CLUSTER_IP_OF
from helpers_hosts import GATEWAY_VM
from helpers_hosts import INVENTORY_VM
from helpers_hosts import IP_OF
from helpers_hosts import on
from helpers_hosts import pm2_apps
from helpers_hosts import queue_info
from helpers_hosts import succeeds

TABLE = "movie_shop_fault"  # beside the hosts' own firewall table, movie_shop
# Processes, as pkill selects them inside a host.
RABBITMQ = ("-x", "beam.smp")
POSTGRES = ("-u", "postgres")
POSTMASTER = ("-o", "-u", "postgres", "-x", "postgres")  # the oldest: the postmaster
INVENTORY_APP = ("-u", "movie-inventory")
BILLING_APP = ("-u", "movie-billing")
ALL_IP_OF = {**IP_OF, **CLUSTER_IP_OF}
BACK_WITHIN = 60  # seconds systemd has to bring a crashed service back


def netns(name):
    """The network namespace scripts/hosts.sh made for host name."""
    return f"movie-shop-{name}"


def nft(name, script, check=True):
    """Run an nft script in host name's network namespace."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns(name), "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"{name}: nft: {proc.stderr}"


def drop_table(incoming=(), outgoing=()):
    """An nft script: drop packets from the addresses incoming and to outgoing.

    Its first two lines make loading it replace an earlier one whole.
    """
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
    ]
    for chain, hook, match, addresses in (
        ("incoming", "input", "ip saddr", incoming),
        ("outgoing", "output", "ip daddr", outgoing),
    ):
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type filter hook {hook} priority -50; policy accept;")
        if addresses:
            lines.append(f"    {match} {{ {', '.join(addresses)} }} counter drop")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def unpartition(name):
    """Remove host name's drop table, if it has one."""
    nft(name, f"table inet {TABLE}\ndelete table inet {TABLE}\n", check=False)


class Fault:
    """One fault: start() injects it, heal() undoes it (safe to call twice)."""

    name = "fault"
    window = None  # seconds it lasts before heal(); None: the test's choice

    def start(self):
        raise NotImplementedError

    def heal(self):
        raise NotImplementedError


class Partition(Fault):
    """All packets between two hosts dropped, both ways; or one way only."""

    def __init__(self, a, b, one_way=False):
        self.a, self.b, self.one_way = a, b, one_way
        arrow = "->" if one_way else "<->"
        self.name = f"partition {a} {arrow} {b}" + (" dropped" if one_way else "")

    def start(self):
        if self.one_way:
            nft(self.a, drop_table(outgoing=[ALL_IP_OF[self.b]]))
        else:
            nft(self.a, drop_table([ALL_IP_OF[self.b]], [ALL_IP_OF[self.b]]))
            nft(self.b, drop_table([ALL_IP_OF[self.a]], [ALL_IP_OF[self.a]]))

    def heal(self):
        unpartition(self.a)
        unpartition(self.b)


class Pause(Fault):
    """SIGSTOP of some processes of a host, SIGCONT to heal."""

    def __init__(self, host, what, selector):
        self.host, self.selector = host, selector
        self.name = f"pause {what} on {host}"

    def start(self):
        on(self.host, "pkill", "-STOP", *self.selector)

    def heal(self):
        on(self.host, "pkill", "-CONT", *self.selector, check=False)


class Crash(Fault):
    """SIGKILL of a service's main process; heal waits for systemd to bring
    the unit back (back_in: how long it took, None if it did not), then
    starts it by hand if it is still down."""

    def __init__(self, host, what, selector, unit):
        self.host, self.selector, self.unit = host, selector, unit
        self.name = f"crash {what} on {host}"
        self.killed_at, self.back_in = None, None

    window = 0  # heal() waits for systemd: the fault lasts as long as it takes

    def start(self):
        on(self.host, "pkill", "-KILL", *self.selector)
        self.killed_at = time.monotonic()

    def active(self):
        return succeeds(self.host, "systemctl", "is-active", "-q", self.unit)

    def heal(self):
        if self.killed_at is None:
            return
        while time.monotonic() - self.killed_at < BACK_WITHIN:
            if self.active() and self.serving():
                # Both clocks are the kernel's CLOCK_MONOTONIC (no time namespace).
                since = on(
                    self.host,
                    "systemctl",
                    "show",
                    "--value",
                    "-p",
                    "ActiveEnterTimestampMonotonic",
                    self.unit,
                )
                self.back_in = int(since) / 1e6 - self.killed_at
                break
            time.sleep(0.5)
        self.killed_at = None
        if self.back_in is None:
            on(self.host, "systemctl", "restart", self.unit, check=False)

    def serving(self):
        """The unit's process answers (a restarted one, not a dying one)."""
        return True


class PostgresCrash(Crash):
    """Crash of PostgreSQL's postmaster: back once pg_isready says so."""

    def __init__(self, host):
        super().__init__(host, "PostgreSQL", POSTMASTER, "postgresql")

    def start(self):
        self.unit = postgres_unit(self.host)  # asked of the host, once it is up
        super().start()

    def serving(self):
        return succeeds(self.host, "pg_isready", "-q")


class DiskAlarm(Fault):
    """RabbitMQ's free-disk limit set above the free space: its disk alarm
    blocks every publisher, as a full disk would."""

    def __init__(self, host=BILLING_VM):
        self.host = host
        self.name = f"disk alarm of RabbitMQ on {host}"
        self.limit = None

    def start(self):
        self.limit = configured_disk_limit(self.host)
        free = int(
            on(self.host, "df", "--output=avail", "-B1", "/var/lib/rabbitmq").split()[
                -1
            ]
        )
        on(self.host, "rabbitmqctl", "-q", "set_disk_free_limit", str(free * 2))

    def heal(self):
        limit = self.limit or configured_disk_limit(self.host)
        on(self.host, "rabbitmqctl", "-q", "set_disk_free_limit", limit, check=False)


def postgres_unit(name):
    """The systemd unit of host name's PostgreSQL cluster (postgresql@15-main)."""
    version, cluster = on(name, "pg_lsclusters", "-h").split()[:2]
    return f"postgresql@{version}-{cluster}"


def configured_disk_limit(name):
    """RabbitMQ's disk_free_limit.absolute from its configuration, else its default."""
    conf = on(name, "cat", "/etc/rabbitmq/rabbitmq.conf", check=False)
    for line in conf.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "disk_free_limit.absolute":
            return value.strip()
    return "50MB"


@contextlib.contextmanager
def injected(fault):
    """Start fault; heal it on leaving, also when the body fails."""
    try:
        fault.start()
        yield fault
    finally:
        fault.heal()


def queue_leader():
    """The host whose RabbitMQ node leads billing_queue (a quorum queue)."""
    info = queue_info(items=("leader",))
    assert info, "no RabbitMQ node answers"
    return re.search(r"rabbit@([\w-]+)", info["leader"]).group(1)


class LeaderFault(Fault):
    """A fault of the RabbitMQ node leading billing_queue, found when it starts."""

    def __init__(self, kind, make):
        self.kind, self.make, self.fault, self.back_in = kind, make, None, None
        self.name = f"{kind} of the queue's leader"

    def start(self):
        self.fault = self.make(queue_leader())
        self.name = f"{self.kind} of the queue's leader ({self.fault.host})"
        self.fault.start()

    def seen(self):
        """The leader's RabbitMQ is stopped (state T) while paused."""
        if not isinstance(self.fault, Pause):
            return False
        states = on(self.fault.host, "ps", "-o", "stat=", "-C", "beam.smp", check=False)
        return any(state.startswith("T") for state in states.split())

    def heal(self):
        if self.fault is not None:
            self.fault.heal()
            self.back_in = getattr(self.fault, "back_in", None)

    @property
    def window(self):
        return 0 if self.kind == "crash" else None


class Isolate(Fault):
    """Every packet between one RabbitMQ node and the other two dropped."""

    def __init__(self, host=None):
        self.host, self.others = host, ()
        self.name = "partition of the queue's leader from the other nodes"

    def start(self):
        self.host = self.host or queue_leader()
        self.others = [ALL_IP_OF[n] for n in BILLING_VMS if n != self.host]
        self.name = f"partition {self.host} <-> the other RabbitMQ nodes"
        nft(self.host, drop_table(self.others, self.others))
        for name in BILLING_VMS:
            if name != self.host:
                nft(name, drop_table([ALL_IP_OF[self.host]], [ALL_IP_OF[self.host]]))

    def seen(self):
        """Packets between the nodes were dropped: the cut is real (the node
        pauses itself only once Erlang sees its peers gone, up to a minute)."""
        listed = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns(self.host),
                "nft",
                "list",
                "table",
                "inet",
                TABLE,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        return any(int(n) > 0 for n in re.findall(r"packets (\d+)", listed))

    def heal(self):
        for name in BILLING_VMS:
            unpartition(name)


class AppCrash(Fault):
    """SIGKILL of a PM2 app's process; heal waits for PM2 to start it again."""

    window = 0

    def __init__(self, host, app, selector):
        self.host, self.app, self.selector = host, app, selector
        self.name = f"crash {app} on {host}"
        self.killed_at, self.back_in, self.pid = None, None, None

    def start(self):
        self.pid = pm2_apps(self.host)[self.app][1]
        on(self.host, "pkill", "-KILL", *self.selector)
        self.killed_at = time.monotonic()

    def heal(self):
        while (
            self.killed_at is not None
            and time.monotonic() - self.killed_at < BACK_WITHIN
        ):
            status, pid, _ = pm2_apps(self.host)[self.app]
            if status == "online" and pid and pid != self.pid:
                self.back_in = time.monotonic() - self.killed_at
                break
            time.sleep(0.5)
        self.killed_at = None


class AppStop(Fault):
    """`pm2 stop APP` on a host; heal: `pm2 start APP`."""

    def __init__(self, host, app):
        self.host, self.app = host, app
        self.name = f"pm2 stop {app} on {host}, then start"

    def start(self):
        on(self.host, "pm2", "stop", self.app)

    def heal(self):
        on(self.host, "pm2", "start", self.app, check=False)


def cluster_faults():
    """The faults of the issue's cluster proof, in the order they run."""
    rabbit = ("RabbitMQ", RABBITMQ)
    return [
        LeaderFault("crash", lambda h: Crash(h, *rabbit, "rabbitmq-server")),
        Isolate(),
        LeaderFault("pause", lambda h: Pause(h, *rabbit)),
        AppCrash("billing-vm-2", "billing_app", BILLING_APP),
        AppStop("inventory-vm-2", "inventory_app"),
    ]


def heal_everything():
    """Undo every fault this module can make, on every host (idempotent)."""
    for name in ALL_IP_OF:
        unpartition(name)
    for name in (BILLING_VM, INVENTORY_VM):
        on(name, "pkill", "-CONT", *POSTGRES, check=False)
    for name in BILLING_VMS:
        if name == BILLING_VM or succeeds(name, "true"):
            on(name, "pkill", "-CONT", *RABBITMQ, check=False)
    on(INVENTORY_VM, "pkill", "-CONT", *INVENTORY_APP, check=False)
    DiskAlarm().heal()


def all_faults():
    """Every fault of the issue "Faults between hosts", in the order they run."""
    return [
        Partition(GATEWAY_VM, BILLING_VM),
        Partition(GATEWAY_VM, INVENTORY_VM),
        Partition(BILLING_VM, GATEWAY_VM, one_way=True),
        Pause(BILLING_VM, "RabbitMQ", RABBITMQ),
        Pause(BILLING_VM, "PostgreSQL", POSTGRES),
        Pause(INVENTORY_VM, "PostgreSQL", POSTGRES),
        Pause(INVENTORY_VM, "inventory.py", INVENTORY_APP),
        Crash(BILLING_VM, "RabbitMQ", RABBITMQ, "rabbitmq-server"),
        PostgresCrash(BILLING_VM),
        DiskAlarm(BILLING_VM),
    ]
