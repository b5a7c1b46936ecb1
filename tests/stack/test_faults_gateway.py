"""The gateway restarted under traffic: no order confirmed with 200 is lost."""

import signal
import time

import helpers


def test_gateway_restart_while_posting(procs, inventory, queue, orders_db):
    procs("billing", helpers.billing_env(queue))
    gateway = helpers.start_gateway(procs, inventory.port, queue)
    posters = helpers.Posters(gateway.port, threads=8, first_user=3_000_000).start()
    try:
        time.sleep(1.5)
        down = time.monotonic()
        exit_code = gateway.stop(signal.SIGTERM)
        gateway.start()  # the same port
        back = time.monotonic()
        helpers.wait_for(
            lambda: posters.ok_since(back) >= 50,
            timeout=30,
            what="posts to succeed through the restarted gateway",
        )
    finally:
        posters.stop()
    assert exit_code == 0
    ok, _, statuses, _ = posters.summary()
    assert {s for s in statuses if isinstance(s, int)} <= {200, 503}, statuses
    counts = helpers.wait_stored(ok, posters.first_user, posters.last_user)
    lost = ok - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    assert not lost and not duplicated
    helpers.figure(
        "gateway_restart",
        posted=len(posters.results),
        ok=len(ok),
        refused_or_cut=sum(n for s, n in statuses.items() if not isinstance(s, int)),
        unavailable=statuses[503],
        stored_ok=len(ok & set(counts)),
        lost=len(lost),
        duplicated=duplicated,
        restart_s=f"{back - down:.2f}",
    )
