-- One caller's request quota: GCRA on a single key, one call per request.
--
-- KEYS[1] = the caller's quota key (holds the theoretical arrival time, TAT, in ms).
-- ARGV[1] = now (unix ms, from the caller's clock so tests control time),
-- ARGV[2] = emission interval (ms per request), ARGV[3] = burst (requests allowed at once).
-- Returns 0 when the request is allowed (and charged), else the milliseconds until it would be.
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return math.ceil(allow_at - now)
end
-- Once now passes the TAT the caller has its full burst again, the same as no key: let it expire.
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return 0
