-- Compare-and-set of the alerts of one shard's parcels, each together with the index, feed, counter
-- and timer writes that go with it, so an alert is never opened twice and its indexes never disagree
-- with it. One call per shard, whatever the number of parcels.
-- KEYS = every key the ops name (one shard tag): the parcels' alert hashes and the other keys.
-- ARGV[1] = TTL of the alert hashes (ms), renewed on every write; then per parcel:
--   key index of its alert hash, the version the caller read ("0": no hash yet), n ops, and n ops
--   of four words each: op, key index, a, b:
--     H  field value        HSET
--     HX field value        HSET only if the key exists (the parcel hash's alert mark)
--     ZA score member       ZADD
--     ZR member -           ZREM
--     TR min max            ZREMRANGEBYLEX (index entries past retention)
--     I  field amount       HINCRBY
--     EX ttl_ms -           PEXPIRE
--     X  maxlen payload     XADD MAXLEN ~ maxlen * a payload
-- A parcel whose hash changed since it was read is left untouched and its position (1-based) is
-- returned: the caller re-reads and re-plans only those.
local ttl = ARGV[1]
local conflicts = {}
local a = 2
local position = 0
while a <= #ARGV do
  position = position + 1
  local hash = KEYS[tonumber(ARGV[a])]
  local expected = ARGV[a + 1]
  local nops = tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + 4 * nops
  local current = redis.call('HGET', hash, 'v') or '0'
  if current ~= expected then
    conflicts[#conflicts + 1] = position
  else
    for i = first, a - 1, 4 do
      local op = ARGV[i]
      local key = KEYS[tonumber(ARGV[i + 1])]
      local x = ARGV[i + 2]
      local y = ARGV[i + 3]
      if op == 'H' then
        redis.call('HSET', key, x, y)
      elseif op == 'HX' then
        if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, x, y) end
      elseif op == 'ZA' then
        redis.call('ZADD', key, x, y)
      elseif op == 'ZR' then
        redis.call('ZREM', key, x)
      elseif op == 'TR' then
        redis.call('ZREMRANGEBYLEX', key, x, y)
      elseif op == 'I' then
        redis.call('HINCRBY', key, x, y)
      elseif op == 'EX' then
        redis.call('PEXPIRE', key, x)
      elseif op == 'X' then
        redis.call('XADD', key, 'MAXLEN', '~', x, '*', 'a', y)
      else
        return redis.error_reply('alerts_apply: unknown op ' .. tostring(op))
      end
    end
    redis.call('HINCRBY', hash, 'v', 1)
    redis.call('PEXPIRE', hash, ttl)
  end
end
return conflicts
