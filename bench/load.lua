-- The one wrk script of `make bench`: every target (seed-style gate, bare handler, product gateway)
-- gets exactly this load. It extends the kit's post_unique.lua (bench/reference/post_unique.lua):
-- same ~220-byte event, `s` cycling over site-pub-1..16, `url` and `sid` unique per event.
--
--   wrk -t1 -c64 -d15s --latency -s bench/load.lua URL -- nonce=<hex> batch=0 rate=0 send_ms=13500
--
-- Arguments (after `--`, key=value):
--   nonce    run-unique string put in every url, so no two wrk runs ever send the same event
--   batch    0 = one event per request (body = the event); N = {"events":[N events of one site]}
--   rate     0 = as fast as the connections go (peak); R = pace the whole thread to R requests/s
--   send_ms  stop sending new requests this long after start; the rest of -d lets in-flight requests
--            finish, so every request sent is also answered and the loss check can be exact
--
-- Pacing: wrk calls delay() before each request on a connection; this script hands out send slots
-- from one schedule per thread (slot k at start + k/R), so R is an aggregate rate over all
-- connections, not a per-connection think time. wrk measures latency from the moment the request is
-- written (after the delay), and the schedule does not burst to catch up after a slow patch: this is
-- rate-limited closed-loop load, honest only while the server keeps up with R (the harness checks
-- the achieved rate).
--
-- Tallies: response() counts answers by HTTP status and by the gate's answer (`status` of a single
-- event, `accepted`/`duplicates`/`rejected`/`invalid` of a batch); done() prints one line
-- `RKBENCH {json}` with the totals of every thread and the latency percentiles (microseconds).

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } rkbench_timespec;
int clock_gettime(int clk_id, rkbench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("rkbench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local EVENT = '{"s":"site-pub-%d","url":"https://example.com/p/some-article-slug?u=%s.%d.%d.%d",'
           .. '"ref":"https://news.example.org/","ec":"c","ea":"e","el":"l","ev":42,"sid":"%d.%d.%d",'
           .. '"vid":"6f1c2a9e0b7d4c3a8e5f","ts":1732480000123}'
local N_SITES = 16
local HOLD_MS = 3600000       -- "never" within a run: wrk stops the thread long before

-- Main Lua state: one entry per wrk thread, read back in done().
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

-- Thread state. The tallies are globals so that done() can read them with thread:get().
tally = {
  sent_requests = 0, sent_events = 0, answers = 0, answers_2xx = 0, answers_other = 0,
  events_2xx = 0, queued = 0, degraded = 0, duplicate = 0, rejected = 0, invalid = 0,
  accepted = 0, unlabelled = 0, other_status = 0, first_send_ms = -1, last_answer_ms = -1,
}
local batch, rate, send_ms, nonce = 0, 0, 0, "x"
local started_ms, stop_at, period_ms, next_slot = 0, math.huge, 0, 0
local n = 0
local running = false         -- false until the first delay(): wrk calls request() once to verify it

function init(args)
  for _, arg in ipairs(args) do
    local key, value = arg:match("^([%w_]+)=(.*)$")
    if key == "nonce" then nonce = value
    elseif key == "batch" then batch = tonumber(value)
    elseif key == "rate" then rate = tonumber(value)
    elseif key == "send_ms" then send_ms = tonumber(value)
    else error("load.lua: unknown argument " .. tostring(arg)) end
  end
  started_ms = now_ms()
  if send_ms > 0 then stop_at = started_ms + send_ms end
  if rate > 0 then period_ms = 1000 / rate end
  next_slot = started_ms
end

function delay()
  running = true
  local t = now_ms()
  local slot = t
  if period_ms > 0 then
    if next_slot < t then next_slot = t end
    slot = next_slot
  end
  -- A paced schedule runs up to one slot per connection ahead of the clock: judge the slot, not now.
  if slot >= stop_at then return HOLD_MS end
  if period_ms > 0 then next_slot = next_slot + period_ms end
  return math.floor(slot - t)
end

local function event(site, i)
  return string.format(EVENT, site, nonce, tid, n, i, tid, n, i)
end

function request()
  n = n + 1
  local site = n % N_SITES + 1
  local body
  if batch > 0 then
    local events = {}
    for i = 1, batch do events[i] = event(site, i) end
    body = '{"events":[' .. table.concat(events, ",") .. ']}'
  else
    body = event(site, 0)
  end
  if running then
    tally.sent_requests = tally.sent_requests + 1
    tally.sent_events = tally.sent_events + math.max(batch, 1)
    if tally.first_send_ms < 0 then tally.first_send_ms = now_ms() end
  end
  return wrk.format(nil, nil, nil, body)
end

local function count_field(body, name)
  local value = body:match('"' .. name .. '"%s*:%s*(%d+)')
  return value and tonumber(value) or 0
end

function response(status, headers, body)
  tally.answers = tally.answers + 1
  tally.last_answer_ms = now_ms()
  if status < 200 or status > 299 then
    tally.answers_other = tally.answers_other + 1
    return
  end
  tally.answers_2xx = tally.answers_2xx + 1
  tally.events_2xx = tally.events_2xx + math.max(batch, 1)
  if batch > 0 then
    tally.accepted = tally.accepted + count_field(body, "accepted")
    tally.duplicate = tally.duplicate + count_field(body, "duplicates")
    tally.rejected = tally.rejected + count_field(body, "rejected")
    tally.invalid = tally.invalid + count_field(body, "invalid")
    return
  end
  local answer = body:match('"status"%s*:%s*"([%w_]+)"')
  if answer == "queued" then
    tally.queued = tally.queued + 1
    tally.accepted = tally.accepted + 1
  elseif answer == "degraded" then
    tally.degraded = tally.degraded + 1
    tally.accepted = tally.accepted + 1
  elseif answer == "duplicate" then
    tally.duplicate = tally.duplicate + 1
  elseif answer == nil then
    tally.unlabelled = tally.unlabelled + 1
  else
    tally.other_status = tally.other_status + 1
  end
end

local function json(obj)
  local keys = {}
  for key in pairs(obj) do table.insert(keys, key) end
  table.sort(keys)
  local parts = {}
  for _, key in ipairs(keys) do
    local value = obj[key]
    if type(value) == "table" then value = json(value) else value = string.format("%.17g", value) end
    table.insert(parts, string.format('"%s":%s', key, value))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local total = {}
  local first, last = math.huge, -1
  for _, thread in ipairs(threads) do
    local t = thread:get("tally")
    for key, value in pairs(t) do
      if key ~= "first_send_ms" and key ~= "last_answer_ms" then total[key] = (total[key] or 0) + value end
    end
    if t.first_send_ms >= 0 and t.first_send_ms < first then first = t.first_send_ms end
    if t.last_answer_ms > last then last = t.last_answer_ms end
  end
  total.active_ms = (last >= 0 and first < math.huge) and (last - first) or 0
  local lat = {}
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    lat["p" .. string.gsub(tostring(p), "%.", "_")] = latency:percentile(p)
  end
  lat.mean = latency.mean
  lat.max = latency.max
  local errors = summary.errors
  io.write("RKBENCH ", json({
    tally = total,
    latency_us = lat,
    wrk = {
      duration_us = summary.duration, requests = summary.requests,
      connect_errors = errors.connect, read_errors = errors.read, write_errors = errors.write,
      status_errors = errors.status, timeouts = errors.timeout,
    },
  }), "\n")
end
