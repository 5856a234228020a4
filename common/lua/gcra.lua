-- GCRA (generic cell rate algorithm) for a whole batch in one call.
--
-- KEYS: the distinct limiter keys of the batch (each holds its theoretical arrival time, TAT, in ms).
-- ARGV[1] = now (unix ms, from the caller's clock so tests control time), ARGV[2] = number of entries,
-- then per entry: amount, number of limits k, and k triples (key index, emission interval ms, burst).
-- An entry is allowed only if every one of its limits allows it; only then are its limits charged, so
-- a notice delayed by one limit does not use up another.
-- Returns per entry 0 (allowed) or the milliseconds after which it would be allowed.
local now = tonumber(ARGV[1])
local entries = tonumber(ARGV[2])
local tats = {}
local touched = {}

local function tat_of(index)
  local tat = tats[index]
  if tat == nil then
    tat = tonumber(redis.call('GET', KEYS[index]) or '0') or 0
    tats[index] = tat
  end
  if tat < now then
    return now
  end
  return tat
end

local result = {}
local pos = 3
for e = 1, entries do
  local amount = tonumber(ARGV[pos])
  local k = tonumber(ARGV[pos + 1])
  pos = pos + 2
  local wait = 0
  local planned = {}
  for j = 1, k do
    local index = tonumber(ARGV[pos])
    local interval = tonumber(ARGV[pos + 1])
    local burst = tonumber(ARGV[pos + 2])
    pos = pos + 3
    local new_tat = tat_of(index) + amount * interval
    local allow_at = new_tat - burst * interval
    if allow_at > now then
      local w = allow_at - now
      if w > wait then
        wait = w
      end
    end
    planned[j] = {index, new_tat}
  end
  if wait == 0 then
    for j = 1, k do
      local p = planned[j]
      tats[p[1]] = p[2]
      touched[p[1]] = true
    end
    result[e] = 0
  else
    result[e] = math.ceil(wait)
  end
end

for index, _ in pairs(touched) do
  local tat = tats[index]
  -- Once now passes the TAT the bucket is full again, the same as no state: let it expire then.
  redis.call('SET', KEYS[index], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
end
return result
