-- POST /api/billing with a fixed, valid order (W5). The gateway answers 200 only
-- after RabbitMQ confirmed the message; bench/run.py keeps billing stopped.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

wrk.method = "POST"
wrk.path = "/api/billing"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_ORDER") or
  '{"user_id": 20, "number_of_items": 3, "total_amount": "25.50"}'
