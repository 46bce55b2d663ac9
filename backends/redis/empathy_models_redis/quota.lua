-- Budgets and rate limits for empathy-models: one script, one key, one atomic step.
-- A port of empathy_models/limits/meter.py (money in integer nano-dollars).
--
-- reserve: KEYS[1] a budget window hash; ARGV: op, window_start, window_end, amount,
--          limit, ttl, bucket.  Returns {granted, field, value, ...}.
-- settle:  ARGV: op, window_start, window_end, held, actual, ttl, bucket.  Same reply.
-- Either may end with a hold id (ARGV[8]): a reservation keeps its bucket under it (the
-- hash field "i:" .. id), and a settlement naming it settles that hold and drops the
-- id; then ARGV[9] is "1" for a settlement sent again, which changes nothing when the
-- window does not keep its id (settled already), while a first one is applied as one
-- without an id.  The id of a hold that lapsed unsettled is kept IDS_KEPT seconds past
-- its bucket's time (meter.LAPSED_IDS_KEPT).
-- A hold is kept in its bucket, the hash field "h:" .. the time it lapses (whole
-- seconds, from meter.hold_bucket); each budget step first releases the buckets whose
-- time (from TIME) has come, counting them in "lapsed".  "at" is TIME at the window's
-- last write: a window written more than CLOCK_STEP seconds after TIME now (the
-- server's clock stepped back since: meter.unstepped) has its holds' lapse times moved
-- back by that much, kept as "l:" .. bucket (the hold stays in its bucket, where its
-- settlement finds it); a reservation into a bucket with such a time drops it (never
-- lapsing early).
-- acquire: KEYS[1] a GCRA schedule (a string: the theoretical arrival time, the
--          reset time of a push back while it is to come, and when it was written); ARGV: op, cost, interval,
--          burst, max_wait.  Returns {granted, wait, place}: place is the schedule's
--          end once the place is taken; time from TIME.
-- adjust:  ARGV: op, delta (seconds)[, place].  With a place, only while the schedule
--          still ends there (no later place taken since).  Returns {1, 0}.
-- push_back: ARGV: op, seconds.  No place comes before TIME + seconds (the reset time
--          is kept with the schedule until it passes), and the schedule ends then at
--          the earliest.  Returns {1, 0}.

-- Redis 4 needs effects replication switched on to write after TIME (Redis 5 and later
-- replicate effects anyway, and Redis 7 keeps the call as a no-op)
if redis.replicate_commands then
  redis.replicate_commands()
end

local OP = ARGV[1]
local COUNTERS = {"limit", "spent", "held", "reserved", "settled", "released",
                  "overrun", "lapsed", "calls", "refused"}

local function now()
  local t = redis.call("TIME")
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function int(x)
  return string.format("%d", x)
end

local function num(x)
  return string.format("%.17g", x)
end

-- A rate-limit schedule: "<tat> @<at>", or "<tat> <until> @<at>" while a push back
-- holds it until a reset time (no place before it, whatever the burst); <at> is TIME
-- when it was written.  The reset time is dropped once it has passed.  A schedule
-- written more than CLOCK_STEP seconds after TIME now (the server's clock stepped back
-- since: meter.unstepped) has its times moved back by that much, and load_schedule says
-- so (its third value), for the step to store it.  Read without "@<at>" (written by an
-- older version), nothing is moved.
local CLOCK_STEP = 1.0
local IDS_KEPT = 3600

local function load_schedule(t)
  local raw = redis.call("GET", KEYS[1])
  if raw == false or raw == nil then
    return nil, nil, false
  end
  local body, at = string.match(raw, "^(.-) @(%S+)$")
  if body == nil then
    body = raw
  end
  local tat, floor = string.match(body, "^(%S+) (%S+)$")
  if tat == nil then
    tat = body
  end
  tat, floor, at = tonumber(tat), tonumber(floor), tonumber(at)
  local moved = false
  if tat ~= nil and at ~= nil and at - t > CLOCK_STEP then
    local back = at - t
    tat = tat - back
    if floor ~= nil then floor = floor - back end
    moved = true
  end
  if floor ~= nil and floor <= t then floor = nil end
  return tat, floor, moved
end

local function save_schedule(tat, floor, t)
  local value, ends = num(tat), tat
  if floor ~= nil then
    value = value .. " " .. num(floor)
    ends = math.max(tat, floor)
  end
  value = value .. " @" .. num(t)
  redis.call("SET", KEYS[1], value, "PX", math.floor((math.max(ends - t, 0) + 60) * 1000))
end

local function load(ws, we)
  local flat = redis.call("HGETALL", KEYS[1])
  local st = {}
  for i = 1, #flat, 2 do
    st[flat[i]] = flat[i + 1]
  end
  -- a window stored with an earlier end (a shorter window of the same budget name
  -- that started here too) ends at the later one (meter._current)
  local out = {window_start = tonumber(st.window_start or ws),
               window_end = math.max(tonumber(st.window_end or we), we)}
  for _, name in ipairs(COUNTERS) do
    out[name] = tonumber(st[name] or "0")
  end
  local t = now()
  out.t = t
  local at = tonumber(st.at)
  local back = nil
  if at ~= nil and at - t > CLOCK_STEP then
    back = at - t
  end
  out.holds = {}
  out.lapses = {}  -- bucket -> lapse time, for holds moved by a step back
  out.gone = {}
  for field, value in pairs(st) do
    local kind = string.sub(field, 1, 2)
    if kind == "l:" then
      out.gone[#out.gone + 1] = field  -- written again below while its hold stays
    elseif kind == "h:" then
      local amount = tonumber(value)
      local b = string.sub(field, 3)
      local lapse = tonumber(st["l:" .. b]) or tonumber(b)
      if back ~= nil then
        lapse = lapse - back
      end
      if lapse <= t then
        out.held = math.max(0, out.held - amount)
        out.lapsed = out.lapsed + amount
        out.gone[#out.gone + 1] = field
      else
        out.holds[field] = amount
        if back ~= nil or st["l:" .. b] ~= nil then
          out.lapses[b] = lapse
        end
      end
    end
  end
  out.ids = {}  -- hold id -> bucket
  for field, value in pairs(st) do
    if string.sub(field, 1, 2) == "i:" then
      if out.holds["h:" .. value] ~= nil or tonumber(value) + IDS_KEPT > t then
        out.ids[string.sub(field, 3)] = value
      else
        out.gone[#out.gone + 1] = field
      end
    end
  end
  return out
end

local function save_and_reply(st, granted, ttl, we)
  -- ttl counts from the caller's window end: a window stored with a later one
  -- (load) is kept as much longer
  ttl = ttl + math.max(0, st.window_end - we)
  local flat = {"window_start", num(st.window_start), "window_end", num(st.window_end),
                "at", num(st.t)}
  for _, name in ipairs(COUNTERS) do
    flat[#flat + 1] = name
    flat[#flat + 1] = int(st[name])
  end
  for field, amount in pairs(st.holds) do
    if amount > 0 then
      flat[#flat + 1] = field
      flat[#flat + 1] = int(amount)
      local lapse = st.lapses[string.sub(field, 3)]
      if lapse ~= nil then
        flat[#flat + 1] = "l:" .. string.sub(field, 3)
        flat[#flat + 1] = num(lapse)
      end
    else
      st.gone[#st.gone + 1] = field
    end
  end
  for id, b in pairs(st.ids) do
    flat[#flat + 1] = "i:" .. id
    flat[#flat + 1] = b
  end
  if #st.gone > 0 then
    redis.call("HDEL", KEYS[1], unpack(st.gone))
  end
  redis.call("HSET", KEYS[1], unpack(flat))
  redis.call("PEXPIRE", KEYS[1], math.floor(ttl * 1000))
  local reply = {granted and "1" or "0"}
  for i = 1, #flat do
    reply[#reply + 1] = flat[i]
  end
  return reply
end

if OP == "reserve" then
  local ws, we = tonumber(ARGV[2]), tonumber(ARGV[3])
  local amount, limit, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local bucket = "h:" .. ARGV[7]
  local st = load(ws, we)
  st.limit = limit
  local granted = st.spent + st.held + amount <= limit
  if granted then
    st.holds[bucket] = (st.holds[bucket] or 0) + amount
    st.lapses[ARGV[7]] = nil  -- moved by a step back: never lapse this one early
    st.held = st.held + amount
    st.reserved = st.reserved + amount
    if ARGV[8] ~= nil then
      st.ids[ARGV[8]] = ARGV[7]
    end
  else
    st.refused = st.refused + 1
  end
  return save_and_reply(st, granted, ttl, we)
elseif OP == "settle" then
  local ws, we = tonumber(ARGV[2]), tonumber(ARGV[3])
  local held, actual, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local bucket = "h:" .. ARGV[7]
  local st = load(ws, we)
  if ARGV[8] ~= nil then
    local named = st.ids[ARGV[8]]
    if named ~= nil then
      st.ids[ARGV[8]] = nil
      st.gone[#st.gone + 1] = "i:" .. ARGV[8]
      bucket = "h:" .. named
    elseif ARGV[9] == "1" then  -- sent again, settled already: nothing changes
      return save_and_reply(st, true, ttl, we)
    end
  end
  held = math.min(held, st.holds[bucket] or 0)  -- 0 once lapsed
  if st.holds[bucket] ~= nil then
    st.holds[bucket] = st.holds[bucket] - held
  end
  st.held = math.max(0, st.held - held)
  st.spent = st.spent + actual
  st.settled = st.settled + math.min(actual, held)
  st.released = st.released + math.max(0, held - actual)
  st.overrun = st.overrun + math.max(0, actual - held)
  if actual > 0 then
    st.calls = st.calls + 1
  end
  return save_and_reply(st, true, ttl, we)
elseif OP == "acquire" then
  local cost, interval = tonumber(ARGV[2]), tonumber(ARGV[3])
  local burst, max_wait = tonumber(ARGV[4]), tonumber(ARGV[5])
  local t = now()
  local tat, floor, moved = load_schedule(t)
  if moved then
    save_schedule(tat, floor, t)  -- kept as moved, whatever the answer
  end
  if tat == nil or tat < t then tat = t end
  local new_tat = tat + cost * interval
  local wait = math.max(0, new_tat - burst * interval - t)
  if floor ~= nil then wait = math.max(wait, floor - t) end
  if wait > max_wait then
    return {"0", num(wait)}
  end
  save_schedule(new_tat, floor, t)
  return {"1", num(wait), num(new_tat)}
elseif OP == "adjust" then
  local delta = tonumber(ARGV[2])
  local t = now()
  local tat, floor = load_schedule(t)
  if ARGV[3] ~= nil and (tat == nil or tat ~= tonumber(ARGV[3])) then
    return {"1", "0"}
  end
  if tat == nil then
    if delta <= 0 then return {"1", "0"} end
    tat = t
  end
  tat = tat + delta
  if delta < 0 and tat < t then tat = t end
  save_schedule(tat, floor, t)
  return {"1", "0"}
elseif OP == "push_back" then
  local t = now()
  local reset = t + tonumber(ARGV[2])
  local tat, floor, moved = load_schedule(t)
  if tat ~= nil and tat >= reset and floor ~= nil and floor >= reset then
    if moved then save_schedule(tat, floor, t) end
    return {"1", "0"}
  end
  if tat == nil or tat < reset then tat = reset end
  if floor == nil or floor < reset then floor = reset end
  save_schedule(tat, floor, t)
  return {"1", "0"}
end
return redis.error_reply("unknown op " .. tostring(OP))
