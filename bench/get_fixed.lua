-- GET the URL given to wrk (W2 search, W3 list all, scale searches).
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
