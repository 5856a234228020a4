-- GCRA (generic cell rate algorithm) for a whole batch in one call.
--
-- KEYS: the distinct limiter keys of the batch (each holds its theoretical arrival time, TAT, in ms).
-- ARGV[1] = now (unix ms, from the caller's clock so tests control time), ARGV[2] = amount each entry
-- costs, then per key (in KEYS order) its emission interval (ms) and burst, then per entry the number
-- of its limits k followed by k key indexes.
-- An entry is allowed only if every one of its limits allows it; only then are its limits charged, so
-- a notice delayed by one limit does not use up another.
-- Returns per entry 0 (allowed) or the milliseconds after which it would be allowed.
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local nkeys = #KEYS
local interval = {}
local tolerance = {}
local tats = {}
for i = 1, nkeys do
  interval[i] = tonumber(ARGV[1 + 2 * i]) * amount
  tolerance[i] = tonumber(ARGV[2 + 2 * i]) * tonumber(ARGV[1 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then
    tat = now
  end
  tats[i] = tat
end

local result = {}
local touched = {}
local pos = 3 + 2 * nkeys
local e = 0
while pos <= #ARGV do
  local k = tonumber(ARGV[pos])
  local wait = 0
  for j = pos + 1, pos + k do
    local i = tonumber(ARGV[j])
    local w = tats[i] + interval[i] - tolerance[i] - now
    if w > wait then
      wait = w
    end
  end
  if wait == 0 then
    for j = pos + 1, pos + k do
      local i = tonumber(ARGV[j])
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
