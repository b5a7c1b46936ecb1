-- GET BENCH_PATH<id> with id drawn uniformly from [BENCH_ID_MIN, BENCH_ID_MAX].
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")

local lo = tonumber(os.getenv("BENCH_ID_MIN") or "1")
local hi = tonumber(os.getenv("BENCH_ID_MAX") or "1000")
local prefix = os.getenv("BENCH_PATH") or "/api/movies/"
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_no or 0) * 7919)
end

function request()
  return wrk.format("GET", prefix .. math.random(lo, hi))
end
