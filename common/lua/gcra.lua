-- GCRA (generic cell rate algorithm) for a whole batch in one call.
--
-- KEYS: the batch's shared limiter keys (providers, merchants: few), then its personal ones (one per
-- recipient); each holds its theoretical arrival time, TAT, in ms.
-- ARGV[1] = now (unix ms, from the caller's clock so tests control time), ARGV[2] = amount each entry
-- costs, ARGV[3] = how many of KEYS are shared, then three MessagePack arrays:
-- ARGV[4] = per shared key (in KEYS order) its emission interval (ms) and burst, then the interval
--           and burst every personal key has;
-- ARGV[5] = the combinations of shared keys that entries name: each its length k, then k key indexes;
-- ARGV[6] = per entry the position in ARGV[5] of its combination, and its personal key's position
--           among the personal keys (1-based; 0 = none).
-- (MessagePack arrays are unpacked in C; a few Lua strings per entry turned back into numbers were most
-- of the script's time for a batch of thousands. Personal keys share one shape, so an entry costs two
-- numbers, whatever its limits.)
-- An entry is allowed only if every one of its limits allows it; only then are its limits charged, so
-- a notice delayed by one limit does not use up another.
-- Returns per entry 0 (allowed) or the milliseconds after which it would be allowed.
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local nshared = tonumber(ARGV[3])
local shapes = cmsgpack.unpack(ARGV[4])
local combos = cmsgpack.unpack(ARGV[5])
local entries = cmsgpack.unpack(ARGV[6])
local nkeys = #KEYS
local interval = {}
local tolerance = {}
local tats = {}
local personal_interval = shapes[2 * nshared + 1] * amount
local personal_tolerance = shapes[2 * nshared + 2] * shapes[2 * nshared + 1]
-- The TATs by MGET, a chunk of keys at a time (Lua's unpack is bounded by its stack): each
-- redis.call costs more than the GET it makes, and a batch names thousands of recipients.
local GET_CHUNK = 1000
for first = 1, nkeys, GET_CHUNK do
  local last = math.min(first + GET_CHUNK - 1, nkeys)
  local stored = redis.call('MGET', unpack(KEYS, first, last))
  for i = first, last do
    if i <= nshared then
      interval[i] = shapes[2 * i - 1] * amount
      tolerance[i] = shapes[2 * i] * shapes[2 * i - 1]
    else
      interval[i] = personal_interval
      tolerance[i] = personal_tolerance
    end
    local tat = tonumber(stored[i - first + 1] or '0') or 0
    if tat < now then
      tat = now
    end
    tats[i] = tat
  end
end

local result = {}
local touched = {}
local e = 0
for pos = 1, #entries, 2 do
  local c = entries[pos]
  local own = entries[pos + 1]
  if own > 0 then
    own = own + nshared
  end
  local last = c + combos[c]
  local wait = 0
  for j = c + 1, last do
    local i = combos[j]
    local w = tats[i] + interval[i] - tolerance[i] - now
    if w > wait then
      wait = w
    end
  end
  if own > 0 then
    local w = tats[own] + interval[own] - tolerance[own] - now
    if w > wait then
      wait = w
    end
  end
  if wait == 0 then
    for j = c + 1, last do
      local i = combos[j]
      tats[i] = tats[i] + interval[i]
      touched[i] = true
    end
    if own > 0 then
      tats[own] = tats[own] + interval[own]
      touched[own] = true
    end
  end
  e = e + 1
  result[e] = math.ceil(wait)
end

for i, _ in pairs(touched) do
  -- Once now passes the TAT the bucket is full again, the same as no state: let it expire then.
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
end
return result
