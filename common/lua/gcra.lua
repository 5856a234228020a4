-- GCRA (generic cell rate algorithm) for a whole batch in one call.
--
-- KEYS: the distinct limiter keys of the batch (each holds its theoretical arrival time, TAT, in ms).
-- ARGV[1] = now (unix ms, from the caller's clock so tests control time), ARGV[2] = amount each entry
-- costs, ARGV[3] = a MessagePack array: per key (in KEYS order) its emission interval (ms) and burst,
-- ARGV[4] = a MessagePack array: per entry the number of its limits k followed by k key indexes.
-- (Two arguments unpacked in C, rather than a few per entry each made a Lua string and converted
-- back to a number: for a batch of thousands of entries that was most of the script's time.)
-- An entry is allowed only if every one of its limits allows it; only then are its limits charged, so
-- a notice delayed by one limit does not use up another.
-- Returns per entry 0 (allowed) or the milliseconds after which it would be allowed.
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local shapes = cmsgpack.unpack(ARGV[3])
local refs = cmsgpack.unpack(ARGV[4])
local nkeys = #KEYS
local interval = {}
local tolerance = {}
local tats = {}
-- The TATs by MGET, a chunk of keys at a time (Lua's unpack is bounded by its stack): each
-- redis.call costs more than the GET it makes, and a batch names thousands of recipients.
local GET_CHUNK = 1000
for first = 1, nkeys, GET_CHUNK do
  local last = math.min(first + GET_CHUNK - 1, nkeys)
  local stored = redis.call('MGET', unpack(KEYS, first, last))
  for i = first, last do
    interval[i] = shapes[2 * i - 1] * amount
    tolerance[i] = shapes[2 * i] * shapes[2 * i - 1]
    local tat = tonumber(stored[i - first + 1] or '0') or 0
    if tat < now then
      tat = now
    end
    tats[i] = tat
  end
end

local result = {}
local touched = {}
local pos = 1
local e = 0
while pos <= #refs do
  local k = refs[pos]
  local wait = 0
  for j = pos + 1, pos + k do
    local i = refs[j]
    local w = tats[i] + interval[i] - tolerance[i] - now
    if w > wait then
      wait = w
    end
  end
  if wait == 0 then
    for j = pos + 1, pos + k do
      local i = refs[j]
      tats[i] = tats[i] + interval[i]
      touched[i] = true
    end
  end
  e = e + 1
  result[e] = math.ceil(wait)
  pos = pos + k + 1
end

for i, _ in pairs(touched) do
  -- Once now passes the TAT the bucket is full again, the same as no state: let it expire then.
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
end
return result
