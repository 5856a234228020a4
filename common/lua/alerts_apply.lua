-- Compare-and-set of one parcel's alerts together with the index, feed, counter and timer writes
-- that go with them, so an alert is never opened twice and its indexes never disagree with it.
-- KEYS[1] = the parcel's alert hash; KEYS[2..] = the other keys the ops name (same shard tag).
-- ARGV[1] = the version the caller read ("0" when the hash did not exist);
-- ARGV[2] = TTL of the alert hash (ms), renewed on every write;
-- ARGV[3..] = ops of four words each: op, key index (into KEYS), a, b:
--   H  field value        HSET on the key
--   ZA score member       ZADD
--   ZR member -           ZREM
--   TR min max            ZREMRANGEBYLEX (index entries past retention)
--   I  field amount       HINCRBY
--   EX ttl_ms -           PEXPIRE
--   X  maxlen payload     XADD MAXLEN ~ maxlen * a payload
-- Returns the new version, or -1 when the hash changed since it was read: nothing was written and
-- the caller re-reads and re-plans that parcel.
local current = redis.call('HGET', KEYS[1], 'v') or '0'
if current ~= ARGV[1] then
  return -1
end
for i = 3, #ARGV, 4 do
  local op = ARGV[i]
  local key = KEYS[tonumber(ARGV[i + 1])]
  local a = ARGV[i + 2]
  local b = ARGV[i + 3]
  if op == 'H' then
    redis.call('HSET', key, a, b)
  elseif op == 'ZA' then
    redis.call('ZADD', key, a, b)
  elseif op == 'ZR' then
    redis.call('ZREM', key, a)
  elseif op == 'TR' then
    redis.call('ZREMRANGEBYLEX', key, a, b)
  elseif op == 'I' then
    redis.call('HINCRBY', key, a, b)
  elseif op == 'EX' then
    redis.call('PEXPIRE', key, a)
  elseif op == 'X' then
    redis.call('XADD', key, 'MAXLEN', '~', a, '*', 'a', b)
  else
    return redis.error_reply('alerts_apply: unknown op ' .. tostring(op))
  end
end
local version = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return version
