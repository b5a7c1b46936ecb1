-- POST /api/movies with a fixed, valid movie (W4). Each request creates a row.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

wrk.method = "POST"
wrk.path = "/api/movies"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"title": "Benchmark movie", ' ..
  '"description": "Posted by bench/post_movie.lua to measure W4."}'
