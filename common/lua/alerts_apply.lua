-- #include due_wake
-- Compare-and-set of the alerts of one shard's parcels, each together with the index, feed, counter
-- and timer writes that go with it, so an alert is never opened twice and its indexes never disagree
-- with it. One call per shard, whatever the number of parcels.
-- KEYS = every key the ops name (one shard tag): the parcels' alert hashes and the other keys.
-- ARGV[1] = TTL (ms) of an alert hash whose parcel hash is gone or never expires; ARGV[2] = the
-- shard's alert hash key without the parcel id (to find the alert an index entry names); ARGV[3] =
-- the scheduler's wake-up channel, where the earliest check timer written is published (see
-- due_wake); then per parcel: key index of its alert hash, key index of its parcel hash, the version the caller read
-- ("0": no hash yet), n ops, and n ops of four words each: op, key index, a, b:
--     H  field value        HSET
--     HX field value        HSET only if the key exists (the parcel hash's alert mark)
--     ZA score member       ZADD
--     ZD score member       ZADD to the shard's due set (a check timer): wakes the scheduler
--     ZR member -           ZREM
--     TR min max            ZREMRANGEBYLEX (index entries past retention)
--     SW fraction count     remove from an index those of `count` entries, from rank
--                           fraction * ZCARD on (wrapping), whose alert is gone
--     K  - -                keep an index at least as long as the parcel's alert hash
--     I  field amount       HINCRBY
--     EX ttl_ms -           PEXPIRE
--     X  maxlen payload     XADD MAXLEN ~ maxlen * a payload
-- The alert hash expires when the parcel hash does (read here, after the engine's write that moved
-- it), so an open alert never vanishes while its parcel is still there.
-- A parcel whose hash changed since it was read is left untouched and its position (1-based) is
-- returned: the caller re-reads and re-plans only those.
local fallback_ttl = tonumber(ARGV[1])
local alerts_prefix = ARGV[2]
local wake = ARGV[3]
local conflicts = {}
local a = 4
local position = 0

local function gone(member)
  local alert_id = string.sub(member, 15)
  local parcel_id = string.match(alert_id, '^(.+):[A-Z_]+:%d+$')
  return parcel_id ~= nil and redis.call('HEXISTS', alerts_prefix .. parcel_id, alert_id) == 0
end

local function sweep(index, fraction, count)
  local size = redis.call('ZCARD', index)
  if size == 0 then return end
  count = math.min(count, size)
  local from = math.min(math.floor(tonumber(fraction) * size), size - 1)
  local sample = redis.call('ZRANGE', index, from, from + count - 1)
  if #sample < count then
    local wrapped = redis.call('ZRANGE', index, 0, count - #sample - 1)
    for _, member in ipairs(wrapped) do sample[#sample + 1] = member end
  end
  for _, member in ipairs(sample) do
    if gone(member) then redis.call('ZREM', index, member) end
  end
end

-- An index must outlive every alert hash it names: each write of a hash keeps its indexes at least as
-- long. One without a TTL was just made, or predates that rule: then its older entries' hashes live
-- at most the fallback.
local function keep(index, ttl)
  local left = redis.call('PTTL', index)
  if left == -1 then
    redis.call('PEXPIRE', index, math.max(ttl, fallback_ttl))
  elseif left >= 0 and left < ttl then
    redis.call('PEXPIRE', index, ttl)
  end
end

while a <= #ARGV do
  position = position + 1
  local hash = KEYS[tonumber(ARGV[a])]
  local parcel = KEYS[tonumber(ARGV[a + 1])]
  local expected = ARGV[a + 2]
  local nops = tonumber(ARGV[a + 3])
  local first = a + 4
  a = first + 4 * nops
  local current = redis.call('HGET', hash, 'v') or '0'
  if current ~= expected then
    conflicts[#conflicts + 1] = position
  else
    local kept = {}
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
      elseif op == 'ZD' then
        due_add(key, x, y)
      elseif op == 'ZR' then
        redis.call('ZREM', key, x)
      elseif op == 'TR' then
        redis.call('ZREMRANGEBYLEX', key, x, y)
      elseif op == 'SW' then
        sweep(key, x, tonumber(y))
      elseif op == 'K' then
        kept[#kept + 1] = key
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
    local ttl = redis.call('PTTL', parcel)
    if ttl <= 0 then ttl = fallback_ttl end
    redis.call('PEXPIRE', hash, ttl)
    for _, index in ipairs(kept) do keep(index, ttl) end
  end
end
publish_wake(wake)
return conflicts
