"""Inventory stopped: the gateway answers 502 at once and still takes orders."""

import helpers


def test_inventory_down_gateway_502_and_billing_still_200(procs, queue, clean_movies):
    inventory_port = helpers.free_port()
    inventory = procs(
        "inventory", helpers.inventory_env(inventory_port), inventory_port
    )
    gateway = helpers.start_gateway(procs, inventory_port, queue)
    # pools a connection
    assert helpers.call(gateway.url, "GET", "/api/movies")[0] == 200
    inventory.stop()
    answers = []
    for method, path, body in (
        ("GET", "/api/movies", None),
        ("GET", "/api/movies/1", None),
        ("POST", "/api/movies", {"title": "Nowhere"}),
        ("PUT", "/api/movies/1", {"title": "Nowhere"}),
        ("DELETE", "/api/movies/1", None),
    ):
        status, answer, seconds = helpers.timed_call(gateway, method, path, body)
        assert status == 502 and answer["error"], (method, path, status, answer)
        assert seconds < helpers.ANSWER_WITHIN
        answers.append(seconds)
    status, _, answer = helpers.call(
        gateway.url, "POST", "/api/billing", helpers.order(5)
    )
    assert status == 200 and answer == {"message": "Message posted"}
    assert helpers.queue_depth(queue) == 1
    status, _, answer = helpers.call(gateway.url, "GET", "/health")
    assert status == 503 and answer["inventory"] != "ok" and answer["rabbitmq"] == "ok"
    inventory.start()
    helpers.wait_for(
        lambda: helpers.call(gateway.url, "GET", "/api/movies")[0] == 200,
        what="the gateway to reach inventory again",
    )
    helpers.figure(
        "inventory_down",
        movie_answers=f"{len(answers)}x502",
        max_502_s=f"{max(answers):.2f}",
        billing=200,
        queued=1,
    )
