-- empathy-models circuit breaker: a Lua port of empathy_models/circuit.py.
--
-- One script, one key, one atomic step.  KEYS[1] is the Redis hash holding one
-- breaker key's state.  ARGV:
--   1 op ("admit" | "record" | "force" | "reset")   2 breaker key   3 key TTL (s)
--   4 the BreakerPolicy's 13 values joined by "," (see P below)
--   5 the revision of the state the caller last read for this key ("" for none)
--   6 the channel of announcements (the prefix and the database: pub/sub channels are
--     the server's, not a database's)
--   7.. op arguments (record: six per report, the last a repeat count, see the dispatch;
--     admit: the lease id to grant, then a deadline: see admit below)
-- A write that gives the key a new generation PUBLISHes "<generation> <key>" on that
-- channel.
-- Time is the server's TIME.  Every write stores a new revision in the hash's "rev"
-- field ("<counter>/<TIME>": the counter grows by one a write; a key that expired or
-- was deleted starts again at 1, at a later TIME).  The reply is one string, the values
--   now, admitted, retry_after, lease_id, lease_expires, rev, form, field1, value1, ...
-- separated by \31 (escaped within a value, see the end), every value a string (""
-- for none): numbers are written as %.17g writes them (see fmt) so that a double
-- survives the trip to Python exactly.  ``form`` says which fields follow, as the caller holds the state of
-- revision ARGV[5] or not:
--   "f"  every field of the state (the caller holds another revision, or none)
--   "s"  none: the operation wrote nothing and the state is the caller's revision
--   "d"  the operation wrote over the caller's revision: only the fields that differ
--        from it, a field the new state lacks as "" (only optional fields are ever
--        left out, and "" reads as none for every one of them)
--
-- Semantics mirror circuit.py line by line; the differential test in
-- backends/redis/tests holds the two to the same results.

-- Redis < 5 needs effects replication switched on to write after TIME (a no-op later)
if redis.replicate_commands then
  redis.replicate_commands()
end

local OP = ARGV[1]
local KEY = ARGV[2]
local KEY_TTL = tonumber(ARGV[3])

local KNOWN_REV = ARGV[5]
local CHANNEL = ARGV[6]

local POLICY_PATTERN = "^" .. string.rep("([^,]+),", 12) .. "([^,]+)$"

-- the policy, read from ARGV[4] when first used (an admission of a CLOSED key never does)
local P = setmetatable({}, { __index = function(p, name)
  setmetatable(p, nil)
  local v = { string.match(ARGV[4], POLICY_PATTERN) }
  p.consecutive_failures = tonumber(v[1])
  p.failure_rate_threshold = tonumber(v[2])
  p.minimum_calls = tonumber(v[3])
  p.window_seconds = tonumber(v[4])
  p.window_buckets = tonumber(v[5])
  p.recovery_seconds = tonumber(v[6])
  p.max_recovery_seconds = tonumber(v[7])
  p.backoff = v[8]
  p.healthy_decay_seconds = tonumber(v[9])
  p.half_open_probes = tonumber(v[10])
  p.probe_lease_seconds = tonumber(v[11])
  p.fatal_open_seconds = tonumber(v[12])
  p.min_retry_after_open = tonumber(v[13])
  p.bucket_seconds = p.window_seconds / p.window_buckets
  return rawget(p, name)
end })

local t = redis.call("TIME")
local NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000

-- ------------------------------------------------------------------ encoding

local floor = math.floor

local function fmt(x)
  if x == floor(x) and x > -1e15 and x < 1e15 and (x ~= 0 or 1 / x > 0) then
    -- an integer of at most 15 digits (not -0): %d writes what %.17g would, in a third
    -- of the time
    return string.format("%d", x)
  end
  return string.format("%.17g", x)
end

local NOW_TEXT = fmt(NOW)

-- The commonest run first, before anything below is built: admitting a call to a CLOSED
-- (or DISABLED) key whose state the caller holds.  It writes nothing, and the reply is
-- the header of the "s" form that the full path below would give.
if OP == "admit" and KNOWN_REV ~= "" then
  local held = redis.call("HMGET", KEYS[1], "state", "rev")
  if held[2] == KNOWN_REV and (held[1] == "closed" or held[1] == "disabled") then
    return table.concat({ NOW_TEXT, "1", "", "", "", KNOWN_REV, "s" }, "\31")
  end
end

-- "" -> nil, "=text" -> "text"
local function opt_str(s)
  if s == nil or s == "" then
    return nil
  end
  return string.sub(s, 2)
end

local function opt_num(s)
  if s == nil or s == "" then
    return nil
  end
  return tonumber(s)
end

-- Python's ``value or default`` for an optional string
local function py_or(value, default)
  if value == nil or value == "" then
    return default
  end
  return value
end

local function copy(st)
  local out = {}
  for k, v in pairs(st) do
    out[k] = v
  end
  return out
end

local function initial_state(now)
  return {
    key = KEY,
    state = "closed",
    generation = 0,
    consecutive_failures = 0,
    window = {},
    open_count = 0,
    leases = {},
    probe_successes = 0,
    updated_at_ts = now,
  }
end

local STATES = { closed = true, open = true, half_open = true, forced_open = true,
                 disabled = true }

-- a stored count as a number: 0 when left out (as the state's own default), nil when
-- it is no finite number
local function stored_count(text)
  if text == nil then
    return 0
  end
  local x = tonumber(text)
  if x == nil or x ~= x or x == math.huge or x == -math.huge then
    return nil
  end
  return x
end

-- a stored value as an error quotes it: its first 40 bytes
local function quoted(text)
  return string.format("%q", string.sub(tostring(text), 1, 40))
end

-- what makes the stored fields ``h`` no state the machine can run (nil: nothing)
local function flaw(h, st)
  if not STATES[st.state] then
    return "state " .. quoted(st.state) .. " is no circuit state"
  end
  for _, name in ipairs({ "generation", "consecutive_failures", "open_count",
                          "probe_successes" }) do
    if st[name] == nil then
      return name .. " " .. quoted(h[name]) .. " is no number"
    end
  end
  for _, name in ipairs({ "opened_at_ts", "open_until_ts", "closed_at_ts",
                          "last_failure_ts", "updated_at_ts" }) do
    if h[name] ~= nil and h[name] ~= "" and tonumber(h[name]) == nil then
      return name .. " " .. quoted(h[name]) .. " is no time"
    end
  end
  return nil
end

-- the stored state (nil for none), its revision ("" when a writer without revisions
-- wrote it last), the stored fields and what makes them unreadable (nil: nothing)
local function load()
  local flat = redis.call("HGETALL", KEYS[1])
  if #flat == 0 then
    return nil, "", {}, nil
  end
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  local st = {
    key = KEY,
    state = h.state or "closed",
    generation = stored_count(h.generation),
    consecutive_failures = stored_count(h.consecutive_failures),
    window = {},
    open_count = stored_count(h.open_count),
    opened_at_ts = opt_num(h.opened_at_ts),
    open_until_ts = opt_num(h.open_until_ts),
    closed_at_ts = opt_num(h.closed_at_ts),
    last_failure_ts = opt_num(h.last_failure_ts),
    leases = {},
    probe_successes = stored_count(h.probe_successes),
    last_error = opt_str(h.last_error),
    reason = opt_str(h.reason),
    updated_at_ts = opt_num(h.updated_at_ts),
  }
  if h.window and h.window ~= "" then
    for b, c, f in string.gmatch(h.window, "([^:;]+):([^:;]+):([^:;]+)") do
      st.window[#st.window + 1] = { tonumber(b), tonumber(c), tonumber(f) }
    end
  end
  if h.leases and h.leases ~= "" then
    for id, exp in string.gmatch(h.leases, "([^:;]+):([^:;]+)") do
      st.leases[#st.leases + 1] = { id, tonumber(exp) }
    end
  end
  return st, h.rev or "", h, flaw(h, st)
end

local COUNTS = { "generation", "consecutive_failures", "open_count", "probe_successes" }
local TIMES = { "opened_at_ts", "open_until_ts", "closed_at_ts", "last_failure_ts",
                "updated_at_ts" }
local TEXTS = { "last_error", "reason" }
local WRITTEN = { key = true, state = true, window = true, leases = true }
for _, names in ipairs({ COUNTS, TIMES, TEXTS }) do
  for _, name in ipairs(names) do
    WRITTEN[name] = true
  end
end

local function encode_window(window)
  local parts = {}
  for i, b in ipairs(window) do
    parts[i] = fmt(b[1]) .. ":" .. fmt(b[2]) .. ":" .. fmt(b[3])
  end
  return table.concat(parts, ";")
end

local function encode_leases(leases)
  local parts = {}
  for i, l in ipairs(leases) do
    parts[i] = l[1] .. ":" .. fmt(l[2])
  end
  return table.concat(parts, ";")
end

local function encode(st)
  local out = { "key", st.key, "state", st.state }
  for _, name in ipairs(COUNTS) do
    out[#out + 1] = name
    out[#out + 1] = fmt(st[name])
  end
  out[#out + 1] = "window"
  out[#out + 1] = encode_window(st.window)
  out[#out + 1] = "leases"
  out[#out + 1] = encode_leases(st.leases)
  for _, name in ipairs(TIMES) do
    if st[name] ~= nil then
      out[#out + 1] = name
      out[#out + 1] = fmt(st[name])
    end
  end
  for _, name in ipairs(TEXTS) do
    if st[name] ~= nil then
      out[#out + 1] = name
      out[#out + 1] = "=" .. st[name]
    end
  end
  return out
end

local function same_rows(a, b)
  if #a ~= #b then
    return false
  end
  for i = 1, #a do
    local x, y = a[i], b[i]
    for j = 1, #x do
      if x[j] ~= y[j] then
        return false
      end
    end
  end
  return true
end

-- the fields of encode(st) whose values differ from the ``stored`` hash (name, value,
-- ...), then the names in ``stored`` that encode(st) lacks (but "rev").  ``old`` is
-- load()'s reading of ``stored``; when ``stored`` was written by this encoding (it has a
-- revision), a field whose value equals old's is the same text and is not formatted
-- again (formatting numbers is most of what a write costs)
local function diff(st, old, stored, old_rev)
  local changed, gone = {}, {}
  if old == nil or old_rev == "" then
    local present = {}
    local flat = encode(st)
    for i = 1, #flat, 2 do
      local name, value = flat[i], flat[i + 1]
      present[name] = true
      if stored[name] ~= value then
        changed[#changed + 1] = name
        changed[#changed + 1] = value
      end
    end
    for name, _ in pairs(stored) do
      if name ~= "rev" and not present[name] then
        gone[#gone + 1] = name
      end
    end
    return changed, gone
  end
  local function put(name, value)
    changed[#changed + 1] = name
    changed[#changed + 1] = value
  end
  if stored.key ~= st.key then
    put("key", st.key)
  end
  if stored.state ~= st.state then
    put("state", st.state)
  end
  for _, name in ipairs(COUNTS) do
    if st[name] ~= old[name] then
      put(name, fmt(st[name]))
    end
  end
  if not same_rows(st.window, old.window) then
    put("window", encode_window(st.window))
  end
  if not same_rows(st.leases, old.leases) then
    put("leases", encode_leases(st.leases))
  end
  for _, name in ipairs(TIMES) do
    local value = st[name]
    if value ~= old[name] then
      if value == nil then
        gone[#gone + 1] = name
      else
        put(name, fmt(value))
      end
    end
  end
  for _, name in ipairs(TEXTS) do
    local value = st[name]
    if value ~= old[name] then
      if value == nil then
        gone[#gone + 1] = name
      else
        put(name, "=" .. value)
      end
    end
  end
  for name, _ in pairs(stored) do
    if name ~= "rev" and not WRITTEN[name] then
      gone[#gone + 1] = name
    end
  end
  return changed, gone
end

-- writes ``st`` over the ``stored`` fields (of revision ``old_rev``, read as ``old``)
-- under a new revision: the hash then holds exactly the fields of encode(st) and "rev".
-- Returns the revision and the fields changed and gone (see diff)
local function save(st, now, old, old_rev, stored)
  local count = (tonumber(string.match(old_rev, "^(%d+)/")) or 0) + 1
  local rev = string.format("%d/%s", count, now == NOW and NOW_TEXT or fmt(now))
  local changed, gone = diff(st, old, stored, old_rev)
  if #gone > 0 then
    redis.call("HDEL", KEYS[1], unpack(gone))
  end
  redis.call("HSET", KEYS[1], "rev", rev, unpack(changed))
  if (st.state == "forced_open" and st.open_until_ts == nil) or st.state == "disabled" then
    -- held until a reset: never let it expire on its own (a DISABLED key's admissions
    -- and outcomes write nothing, so a TTL would end it however busy the key is)
    redis.call("PERSIST", KEYS[1])
  else
    local ttl = KEY_TTL
    if st.open_until_ts ~= nil and st.open_until_ts > now then
      ttl = ttl + (st.open_until_ts - now)
    end
    -- capped at 2^53 - 1 ms (285,000 years): a larger number would be sent as "1e+18"
    -- and refused as not an integer (an absurd Retry-After would fail the script)
    redis.call("PEXPIRE", KEYS[1], math.min(math.ceil(ttl * 1000), 9007199254740991))
  end
  return rev, changed, gone
end

-- ------------------------------------------------------------------ the machine

local function open_seconds(trips)
  local k = math.max(1, trips)
  local raw
  if P.backoff == "exponential" then
    raw = P.recovery_seconds * (2.0 ^ math.min(k - 1, 62))
  else
    raw = P.recovery_seconds * k
  end
  return math.min(raw, P.max_recovery_seconds)
end

local function bucket(now)
  return math.floor(now / P.bucket_seconds)
end

local function live_window(st, now)
  local oldest = bucket(now) - P.window_buckets + 1
  local out = {}
  for _, b in ipairs(st.window) do
    if b[1] >= oldest then
      out[#out + 1] = { b[1], b[2], b[3] }
    end
  end
  return out
end

local function add_to_window(window, b, failed, count)
  local f = 0
  if failed then
    f = count
  end
  local last = window[#window]
  if last ~= nil and last[1] == b then
    window[#window] = { b, last[2] + count, last[3] + f }
  else
    window[#window + 1] = { b, count, f }
  end
  return window
end

-- ``count`` successes of the current generation in CLOSED, as one step
local function closed_successes(st, count, now)
  local n = copy(st)
  n.window = add_to_window(live_window(st, now), bucket(now), false, count)
  n.consecutive_failures = 0
  n.updated_at_ts = now
  return n
end

-- when the healthy time that decays trips began, as a clock running at now (as
-- circuit._healthy_since): closed_at_ts while closed; now less the healthy time a key
-- forced by hand holds, paused at opened_at_ts when forced open (forced_open with
-- closed_at_ts set, and the half_open after it), at updated_at_ts when disabled; nil
-- when there is none
local function healthy_since(st, now)
  local closed = st.closed_at_ts
  if closed == nil or st.state == "closed" then
    return closed
  end
  local paused = st.opened_at_ts
  if st.state == "disabled" then
    paused = st.updated_at_ts
  end
  if paused == nil then
    paused = closed
  end
  return now - math.max(0.0, paused - closed)
end

local function decayed_trips(st, now)
  local since = healthy_since(st, now)
  if st.open_count == 0 or since == nil then
    return st.open_count
  end
  local healthy = math.max(0.0, now - since)
  return math.max(0, st.open_count - math.floor(healthy / P.healthy_decay_seconds))
end

-- a 429 whose Retry-After (at least min_retry_after_open) opens at once
local function holds_off(outcome, retry_after)
  return outcome == "rate_limited" and retry_after ~= nil
    and retry_after >= P.min_retry_after_open
end

-- OPEN from now: a trip counts one more recent trip and opens for open_seconds of them
-- (or retry_after if longer); a rate limit alone (trip false) opens for exactly
-- retry_after and leaves the (decayed) trip count as it is
local function do_open(st, now, retry_after, err, reason, trip)
  local trips = decayed_trips(st, now)
  local untl
  if trip then
    trips = trips + 1
    untl = now + open_seconds(trips)
    if retry_after ~= nil then
      untl = math.max(untl, now + retry_after)
    end
  else
    untl = now + retry_after
  end
  local n = copy(st)
  n.state = "open"
  n.generation = st.generation + 1
  n.open_count = trips
  n.opened_at_ts = now
  n.closed_at_ts = nil
  n.open_until_ts = untl
  n.leases = {}
  n.probe_successes = 0
  if err ~= nil then
    n.last_error = err
  end
  n.reason = reason
  n.updated_at_ts = now
  return n
end

local function do_close(st, now)
  -- trips decay from now on, or go on from where a manual force held them
  local since = healthy_since(st, now)
  local n = copy(st)
  n.state = "closed"
  n.generation = st.generation + 1
  n.consecutive_failures = 0
  n.window = {}
  n.opened_at_ts = nil
  n.open_until_ts = nil
  n.closed_at_ts = now
  if since ~= nil then
    n.closed_at_ts = since
  end
  n.leases = {}
  n.probe_successes = 0
  n.reason = nil
  n.updated_at_ts = now
  return n
end

-- forced open from now; by_hand (force), the healthy time the key had is held,
-- paused at opened_at_ts; by a fatal error (its caller decayed the trips) it is dropped
local function do_force_open(st, now, untl, reason, err, by_hand)
  if st.state == "forced_open" and st.open_until_ts ~= nil then
    -- never shorten: a second fatal error can only extend the forced period
    if untl ~= nil then
      untl = math.max(untl, st.open_until_ts)
    end
  end
  local n = copy(st)
  n.state = "forced_open"
  n.generation = st.generation + 1
  n.opened_at_ts = now
  n.open_until_ts = untl
  -- time spent forced open is not healthy time: trips decay only while CLOSED
  n.closed_at_ts = nil
  if by_hand then
    n.closed_at_ts = healthy_since(st, now)
  end
  n.leases = {}
  n.probe_successes = 0
  if err ~= nil then
    n.last_error = err
  end
  n.reason = reason
  n.updated_at_ts = now
  return n
end

local function to_half_open(st, now)
  local n = copy(st)
  n.state = "half_open"
  n.generation = st.generation + 1
  n.leases = {}
  n.probe_successes = 0
  n.updated_at_ts = now
  return n
end

-- circuit.unstepped: a key last written more than CLOCK_STEP seconds ahead of now (the
-- server's clock stepped back since) has its times moved back by that much, so each
-- keeps the age, and an end the time left, it had then: the open end, leases, when it
-- opened, closed and last failed, and (``window`` true: the policy is the key's) the
-- window's buckets, by as many buckets as lie between the write's and now's.  A key
-- with nothing to move (DISABLED, FORCED_OPEN until a reset, HALF_OPEN without a lease
-- out, CLOSED without ``window``) stays.  Returns the state and whether it changed
local CLOCK_STEP = 1.0

local function unstepped(st, now, window)
  local last = st.updated_at_ts
  if last == nil or not (last - now > CLOCK_STEP) then
    return st, false
  end
  if st.state == "disabled" or (st.state == "closed" and not window) then
    return st, false
  end
  if st.state ~= "closed" and st.open_until_ts == nil and #st.leases == 0 then
    return st, false
  end
  local back = last - now
  local function moved(t)
    if t == nil then
      return nil
    end
    return math.max(0.0, t - back)
  end
  local n = copy(st)
  if window and #st.window > 0 then
    local buckets = bucket(last) - bucket(now)
    local rows = {}
    for i, b in ipairs(st.window) do
      rows[i] = { b[1] - buckets, b[2], b[3] }
    end
    n.window = rows
  end
  n.opened_at_ts = moved(st.opened_at_ts)
  n.open_until_ts = moved(st.open_until_ts)
  n.closed_at_ts = moved(st.closed_at_ts)
  n.last_failure_ts = moved(st.last_failure_ts)
  local leases = {}
  for _, l in ipairs(st.leases) do
    leases[#leases + 1] = { l[1], math.max(0.0, l[2] - back) }
  end
  n.leases = leases
  n.updated_at_ts = now
  return n, true
end

-- returns new_state, changed, admitted, retry_after, lease_id, lease_expires.
-- ``deadline`` (TIME, or nil): when the caller stops waiting for this admission.  Run
-- after it (the command reached Redis late: a stall, a congested link), the admission
-- takes no probe lease: nobody would use or report it, and it would hold the slot for
-- probe_lease_seconds as a crashed prober does
local function admit(st, now, new_lease_id, deadline)
  local s = st.state
  if s == "closed" or s == "disabled" then
    return st, false, true, nil, nil, nil
  end
  local changed
  st, changed = unstepped(st, now, true)
  if s == "open" or s == "forced_open" then
    local untl = st.open_until_ts
    if untl == nil or now < untl then
      local retry = nil
      if untl ~= nil then
        retry = untl - now
      end
      return st, changed, false, retry, nil, nil
    end
    st = to_half_open(st, now)
    changed = true
  end
  -- HALF_OPEN
  local live = {}
  for _, l in ipairs(st.leases) do
    if l[2] > now then
      live[#live + 1] = l
    end
  end
  local late = deadline ~= nil and now > deadline
  if #live < P.half_open_probes and not late then
    local expires = now + P.probe_lease_seconds
    local n = copy(st)
    live[#live + 1] = { new_lease_id, expires }
    n.leases = live
    n.updated_at_ts = now
    return n, true, true, nil, new_lease_id, expires
  end
  if #live ~= #st.leases then
    st = copy(st)
    st.leases = live
    st.updated_at_ts = now
    changed = true
  end
  if #live == 0 then
    -- late, and a slot free: refused, with nothing to wait for
    return st, changed, false, nil, nil, nil
  end
  local earliest = live[1][2]
  for _, l in ipairs(live) do
    earliest = math.min(earliest, l[2])
  end
  return st, changed, false, earliest - now, nil, nil
end

local function is_failure(outcome)
  return outcome == "failure" or outcome == "rate_limited" or outcome == "fatal"
end

-- returns new_state, changed
local function apply_outcome(st, r, now)
  if r.generation ~= st.generation then
    -- a 429 from before the circuit opened still holds an open circuit at least that
    -- long (never shortened; no transition) -- circuit.py apply_outcome / extends_open
    if r.generation < st.generation and r.outcome == "rate_limited" and r.retry_after ~= nil
      and (st.state == "open" or st.state == "forced_open") and st.open_until_ts ~= nil
      and now + r.retry_after > st.open_until_ts then
      local n = copy(st)
      n.open_until_ts = now + r.retry_after
      n.updated_at_ts = now
      return n, true
    end
    return st, false
  end
  local outcome = r.outcome
  local s = st.state

  if s == "disabled" then
    return st, false
  end

  if s == "half_open" then
    local lease = nil
    local remaining = {}
    for _, l in ipairs(st.leases) do
      if r.lease_id ~= nil and l[1] == r.lease_id then
        if lease == nil then
          lease = l
        end
      else
        remaining[#remaining + 1] = l
      end
    end
    if lease == nil or lease[2] <= now then
      -- not a probe of this half-open period, or its lease expired: too late to count
      return st, false
    end
    if outcome == "success" then
      local successes = st.probe_successes + 1
      if successes >= P.half_open_probes then
        return do_close(st, now), true
      end
      local n = copy(st)
      n.leases = remaining
      n.probe_successes = successes
      n.updated_at_ts = now
      return n, true
    end
    if outcome == "fatal" then
      local failed = copy(st)
      failed.last_failure_ts = now
      failed.open_count = decayed_trips(st, now)  -- as circuit._fatal
      return do_force_open(failed, now, now + P.fatal_open_seconds,
        py_or(r.error, "fatal error"), r.error), true
    end
    if is_failure(outcome) then
      local n = copy(st)
      n.last_failure_ts = now
      if holds_off(outcome, r.retry_after) then
        return do_open(n, now, r.retry_after, r.error, string.format(
          "half-open probe rate limited (Retry-After %gs)", r.retry_after), false), true
      end
      return do_open(n, now, r.retry_after, r.error, "half-open probe failed", true), true
    end
    -- ignored / cancelled / rejected / not_sent: return the lease, learn nothing
    local n = copy(st)
    n.leases = remaining
    n.updated_at_ts = now
    return n, true
  end

  if s ~= "closed" then
    -- OPEN / FORCED_OPEN issue no tickets of their own generation; nothing to count
    return st, false
  end

  if outcome == "success" then
    return closed_successes(st, 1, now), true
  end
  if outcome == "fatal" then
    local failed = copy(st)
    failed.last_failure_ts = now
    -- the trips the time closed until now forgot stay forgotten (as circuit._fatal)
    failed.open_count = decayed_trips(st, now)
    return do_force_open(failed, now, now + P.fatal_open_seconds,
      py_or(r.error, "fatal error"), r.error), true
  end
  if not is_failure(outcome) then
    return st, false
  end

  local window = add_to_window(live_window(st, now), bucket(now), true, 1)
  local streak = st.consecutive_failures + 1
  local n = copy(st)
  n.consecutive_failures = streak
  n.window = window
  n.last_failure_ts = now
  if r.error ~= nil then
    n.last_error = r.error
  end
  n.updated_at_ts = now
  st = n
  local retry_after = r.retry_after
  if streak >= P.consecutive_failures then
    return do_open(st, now, retry_after, r.error,
      string.format("%d consecutive failures", streak), true), true
  end
  local calls = 0
  local failures = 0
  for _, b in ipairs(window) do
    calls = calls + b[2]
    failures = failures + b[3]
  end
  if calls >= P.minimum_calls and failures / calls >= P.failure_rate_threshold then
    return do_open(st, now, retry_after, r.error,
      string.format("failure rate %d/%d over %gs", failures, calls, P.window_seconds), true), true
  end
  if holds_off(outcome, retry_after) then
    return do_open(st, now, retry_after, r.error,
      string.format("rate limited (Retry-After %gs)", retry_after), false), true
  end
  return st, true
end

-- the probe lease ``id`` given back (an admission whose caller gave up on it); none
-- held: nothing changes
local function release(st, id, now)
  local held = false
  for _, l in ipairs(st.leases) do
    held = held or l[1] == id
  end
  if not held then
    return st, false
  end
  st = unstepped(st, now, false)  -- the other leases keep their time left
  local kept = {}
  for _, l in ipairs(st.leases) do
    if l[1] ~= id then
      kept[#kept + 1] = l
    end
  end
  local n = copy(st)
  n.leases = kept
  n.updated_at_ts = now
  return n, true
end

local function force(st, target, now, untl, reason)
  st = unstepped(st, now, false)  -- a forced end is never shortened: by the time left
  if target == "forced_open" then
    return do_force_open(st, now, untl, py_or(reason, "forced open"), nil, true)
  end
  if target == "closed" then
    local n = do_close(st, now)
    n.reason = reason
    return n
  end
  -- disabled (the caller validated the target)
  local n = copy(st)
  n.state = "disabled"
  n.generation = st.generation + 1
  n.leases = {}
  n.probe_successes = 0
  n.opened_at_ts = nil
  n.open_until_ts = nil
  n.closed_at_ts = healthy_since(st, now)
  n.reason = py_or(reason, "disabled")
  n.updated_at_ts = now
  return n
end

local function reset(st, now)
  local generation = 1  -- a key never written reads as generation 0
  if st ~= nil then
    generation = st.generation + 1
  end
  local n = initial_state(now)
  n.generation = generation
  n.closed_at_ts = now
  return n
end

-- ------------------------------------------------------------------ dispatch

local current, current_rev, stored, unreadable = load()
if unreadable ~= nil then
  if OP ~= "reset" then
    -- that key's fault alone: the store names it, and the breaker runs the key on a
    -- fallback of its own until a reset repairs it
    return redis.error_reply("UNREADABLE " .. unreadable)
  end
  -- a reset repairs it: the hash written again whole, at a generation past the stored
  -- one when that is a number
  redis.call("DEL", KEYS[1])
  current.generation = current.generation or 0
  current_rev, stored = "", {}
end
local state = current
local changed = false
local admitted, retry_after, lease_id, lease_expires = nil, nil, nil, nil

if OP == "admit" then
  if state == nil then
    state = initial_state(NOW)
  end
  -- ARGV[8]: the deadline, in whole milliseconds of TIME ("" for none)
  local deadline = opt_num(ARGV[8])
  if deadline ~= nil then
    deadline = deadline / 1000
  end
  state, changed, admitted, retry_after, lease_id, lease_expires =
    admit(state, NOW, ARGV[7], deadline)
elseif OP == "record" then
  if state == nil then
    state = initial_state(NOW)
  end
  -- each report is (generation, lease, outcome, retry_after, error, count): ``count``
  -- identical reports in a row, as the store sends a written-behind batch of successes
  local reports = {}
  for i = 7, #ARGV - 5, 6 do
    reports[#reports + 1] = {
      generation = tonumber(ARGV[i]),
      lease_id = opt_str(ARGV[i + 1]),
      outcome = ARGV[i + 2],
      retry_after = opt_num(ARGV[i + 3]),
      error = opt_str(ARGV[i + 4]),
      count = tonumber(ARGV[i + 5]),
    }
  end
  -- times a clock stepped back left ahead move first: the outcomes are judged by them
  state, changed = unstepped(state, NOW, true)
  local i, n = 1, #reports
  while i <= n do
    local r = reports[i]
    if r.outcome == "success" and state.state == "closed" and r.generation == state.generation then
      -- a run of CLOSED successes (written behind by the breaker) in one step
      local count = r.count
      local j = i + 1
      while j <= n and reports[j].outcome == "success" and reports[j].generation == state.generation do
        count = count + reports[j].count
        j = j + 1
      end
      state = closed_successes(state, count, NOW)
      changed = true
      i = j
    else
      -- one of r.count identical reports; the rest are looked at again, in order
      local c
      state, c = apply_outcome(state, r, NOW)
      changed = changed or c
      if r.count > 1 then
        r.count = r.count - 1
      else
        i = i + 1
      end
    end
  end
elseif OP == "force" then
  if state == nil then
    state = initial_state(NOW)
  end
  -- ARGV[8] an end (UTC epoch seconds) or ARGV[10] a span from the server's TIME
  local untl = opt_num(ARGV[8])
  local span = opt_num(ARGV[10])
  if span ~= nil then
    untl = NOW + span
  end
  state = force(state, ARGV[7], NOW, untl, opt_str(ARGV[9]))
  changed = true
elseif OP == "reset" then
  state = reset(state, NOW)
  changed = true
elseif OP == "release" then
  -- ARGV[7] the lease id of an admission its caller gave up on (see the store's admit)
  if state == nil then
    state = initial_state(NOW)  -- replied, never written: there is nothing to give back
  else
    state, changed = release(state, ARGV[7], NOW)
  end
else
  return redis.error_reply("unknown breaker operation " .. tostring(OP))
end

local flat
local rev = current_rev
local form = "f"
local caller_holds_current = current ~= nil and current_rev ~= "" and current_rev == KNOWN_REV
if changed or (current == nil and OP ~= "release") then
  local written, gone
  rev, written, gone = save(state, NOW, current, current_rev, stored)
  if current == nil or current.generation ~= state.generation then
    -- a new generation (every transition, and a key created): announced as
    -- "<generation> <key>" on the store's channel (ARGV[6]), for the local views
    -- of every process (see the store's change feed); pcall: a user whose ACL grants
    -- no channels (Redis 7's default for new users) still writes, and its breakers'
    -- views, whose feed cannot subscribe either, expire by their TTL
    redis.pcall("PUBLISH", CHANNEL, fmt(state.generation) .. " " .. KEY)
  end
  if not caller_holds_current then
    flat = encode(state)
  else
    -- the stored fields were those of the caller's revision: send what differs
    form = "d"
    flat = written
    for _, name in ipairs(gone) do
      flat[#flat + 1] = name
      flat[#flat + 1] = ""
    end
  end
elseif caller_holds_current then
  -- nothing written and the caller holds this very revision: the header suffices
  form = "s"
  flat = {}
else
  flat = encode(state)
end

local function s(x)
  if x == nil then
    return ""
  end
  if type(x) == "number" then
    return fmt(x)
  end
  return x
end

local admitted_s = ""
if admitted ~= nil then
  admitted_s = admitted and "1" or "0"
end
-- one string, the values separated by \31 (the unit separator): a reply of one bulk
-- string costs the client a fraction of what parsing ~30 elements does.  Within a value
-- \27 is written \27\27 and \31 is written \27| (keys and error texts are free text)
local ESCAPES = { ["\27"] = "\27\27", ["\31"] = "\27|" }
local reply = { NOW_TEXT, admitted_s, s(retry_after), s(lease_id), s(lease_expires), rev, form }
for _, v in ipairs(flat) do
  reply[#reply + 1] = v
end
if string.find(table.concat(reply), "[\27\31]") then
  for i = 1, #reply do
    reply[i] = string.gsub(reply[i], "[\27\31]", ESCAPES)
  end
end
return table.concat(reply, "\31")
