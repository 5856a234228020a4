-- Settle a batch of one shard's notices in one call: record outcomes, mark sends done, reschedule
-- retries, dead-letter, and acknowledge the outbox entries.
--
-- KEYS[1] = outbox:{s}, KEYS[2] = due:{s}, KEYS[3] = dlq:{s}, then the keys the ops name, in op order
-- (parcel hashes and idempotency keys, all of shard s).
-- ARGV[1] = consumer group, ARGV[2] = retention of "sent" idempotency keys (ms), ARGV[3] = now (ms),
-- then the ops, each a name followed by its arguments:
--   ack <entry id>                         XACK + XDEL the outbox entry: it is settled (the entries
--                                          are acknowledged and deleted together, after the other ops)
--   rec <kind> <bytes>           (1 key)   append a NoticeView(attempts=[...]) to the parcel's a:<kind>
--   sent                         (1 key)   the idempotency key is done: never send it again
--   free                         (1 key)   release a "sending" claim that did not send (limited, quiet)
--   resched <kind> <version> <member> <due ms> <body>   (1 key)
--                                          if the notice is still this version: new body, back in due
--   dlq <kind> <version> <body> <reason>   (1 key)   park it in the dead-letter stream (same check)
--   dlqdel <entry id>                      remove a replayed entry from the dead-letter stream
--   incr <field> <amount>        (1 key)   HINCRBY a merchant's counter hash (counters of the shard)
--   pexp <ms>                    (1 key)   PEXPIRE that hash: it is kept that long after this write
-- A notice whose version changed (or whose body is gone: cancelled) was superseded by the engine and
-- is dropped. Returns the number of notices dropped that way.
local group = ARGV[1]
local retention_ms = ARGV[2]
local now = ARGV[3]
local a = 4
local k = 4
local dropped = 0
local acked = {}
-- XACK and XDEL take many ids: a few calls per batch instead of two per entry. Lua's unpack is
-- bounded by its stack (8,000 values by default), hence the chunks.
local ACK_CHUNK = 1000

local function ack_all(ids)
  for first = 1, #ids, ACK_CHUNK do
    local last = math.min(first + ACK_CHUNK - 1, #ids)
    redis.call('XACK', KEYS[1], group, unpack(ids, first, last))
    redis.call('XDEL', KEYS[1], unpack(ids, first, last))
  end
end

local function current(parcel, kind, version)
  local fields = redis.call('HMGET', parcel, 'nv:' .. kind, 'n:' .. kind)
  return fields[1] == version and fields[2] ~= false
end

while a <= #ARGV do
  local op = ARGV[a]
  if op == 'ack' then
    acked[#acked + 1] = ARGV[a + 1]
    a = a + 2
  elseif op == 'rec' then
    local parcel = KEYS[k]
    -- A parcel removed after retention is not brought back by a late outcome.
    if redis.call('EXISTS', parcel) == 1 then
      local field = 'a:' .. ARGV[a + 1]
      local before = redis.call('HGET', parcel, field) or ''
      redis.call('HSET', parcel, field, before .. ARGV[a + 2])
    end
    k = k + 1
    a = a + 3
  elseif op == 'sent' then
    redis.call('SET', KEYS[k], 'sent', 'PX', retention_ms)
    k = k + 1
    a = a + 1
  elseif op == 'free' then
    if redis.call('GET', KEYS[k]) == 'sending' then
      redis.call('DEL', KEYS[k])
    end
    k = k + 1
    a = a + 1
  elseif op == 'resched' then
    local parcel = KEYS[k]
    if current(parcel, ARGV[a + 1], ARGV[a + 2]) then
      redis.call('HSET', parcel, 'n:' .. ARGV[a + 1], ARGV[a + 5])
      redis.call('ZADD', KEYS[2], ARGV[a + 4], ARGV[a + 3])
    else
      dropped = dropped + 1
    end
    k = k + 1
    a = a + 6
  elseif op == 'dlq' then
    local parcel = KEYS[k]
    if current(parcel, ARGV[a + 1], ARGV[a + 2]) then
      redis.call('XADD', KEYS[3], '*', 'n', ARGV[a + 3], 'reason', ARGV[a + 4], 'at', now)
    else
      dropped = dropped + 1
    end
    k = k + 1
    a = a + 5
  elseif op == 'dlqdel' then
    redis.call('XDEL', KEYS[3], ARGV[a + 1])
    a = a + 2
  elseif op == 'incr' then
    redis.call('HINCRBY', KEYS[k], ARGV[a + 1], ARGV[a + 2])
    k = k + 1
    a = a + 3
  elseif op == 'pexp' then
    redis.call('PEXPIRE', KEYS[k], ARGV[a + 1])
    k = k + 1
    a = a + 2
  else
    return redis.error_reply('settle: unknown op ' .. tostring(op))
  end
end
ack_all(acked)
return dropped
