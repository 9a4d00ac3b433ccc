-- Counts only the responses after the first WARMUP seconds of each wrk thread, when every
-- connection has long been opened: the steady rate, without TLS set-up in the window.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } luksctl_timespec;
int clock_gettime(int clock, luksctl_timespec *ts);
]]
local function now()
  local ts = ffi.new("luksctl_timespec")
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

function init(args)
  warmup = tonumber(args[1])
  started = now()
  counted = 0
  first = 0
  last = 0
end

function response(status, headers, body)
  local t = now()
  if t - started >= warmup then
    if counted == 0 then first = t end
    counted = counted + 1
    last = t
  end
end

function done(summary, latency, requests)
  local total, span_start, span_end = 0, nil, nil
  for _, thread in ipairs(threads) do
    total = total + thread:get("counted")
    local s, w = thread:get("started"), thread:get("warmup")
    if span_start == nil or s + w < span_start then span_start = s + w end
    local l = thread:get("last")
    if span_end == nil or l > span_end then span_end = l end
  end
  if total > 1 and span_end > span_start then
    io.write(string.format("Steady requests: %d in %.2fs after warm-up\n", total, span_end - span_start))
  else
    io.write("Steady requests: 0 in 0.00s after warm-up\n")
  end
end
