-- #include group_info
-- #include due_wake
-- Settle a batch of one shard's notices in one call: record outcomes, mark sends done, reschedule
-- retries, dead-letter, acknowledge the outbox entries and trim the settled ones off the stream.
--
-- KEYS[1] = outbox:{s}, KEYS[2] = due:{s}, KEYS[3] = dlq:{s}, then the keys the ops name, in op order
-- (parcel hashes and idempotency keys, all of shard s).
-- ARGV[1] = consumer group, ARGV[2] = retention of "sent" idempotency keys (ms), ARGV[3] = now (ms),
-- ARGV[4] = the ops, ARGV[5] = the outbox entry ids to acknowledge: each a MessagePack array, which
-- Redis's cmsgpack unpacks in C (a batch's thousands of separate arguments each cost the client a
-- formatted length and Redis an object). The entries are acknowledged after the ops, then the stream
-- is trimmed (see trim_settled). ARGV[6] = how long dead letters are kept (ms; 0: until replayed).
-- ARGV[7] = the scheduler's wake-up channel: the earliest due time a resched wrote is published there
-- (see due_wake), so the dispatcher takes a retry or a replay due now at once.
-- Each op is a name followed by its arguments:
--   rec <kind> <bytes>           (1 key)   append a NoticeView(attempts=[...]) to the parcel's a:<kind>
--   told <version> <slot> <rid>  (1 key)   a slot notice went out: the parcel's told slot (tv, ts, tr)
--   sent                         (1 key)   the idempotency key is done: never send it again
--   free                         (1 key)   release a "sending" claim that did not send (limited, quiet)
--   resched <kind> <version> <member> <due ms> <body>   (1 key)
--                                          if the notice is still this version: new body, a new parcel
--                                          version ('v'), back in due
--   dlq <kind> <version> <body> <reason>   (1 key)   park it in the dead-letter stream (same check)
--   dlqdel <entry id>                      remove a replayed entry from the dead-letter stream
--   incr <field> <amount>        (1 key)   HINCRBY a merchant's counter hash (counters of the shard)
--   pexp <ms>                    (1 key)   PEXPIRE that hash: it is kept that long after this write
-- A notice whose version changed (or whose body is gone: cancelled) was superseded by the engine and
-- is dropped. Returns the number of notices dropped that way.
local group = ARGV[1]
local retention_ms = ARGV[2]
local now = ARGV[3]
local ops = cmsgpack.unpack(ARGV[4])
local acked = cmsgpack.unpack(ARGV[5])
local dead_letter_retention_ms = tonumber(ARGV[6])
local dead_lettered = false
local a = 1
local k = 4
local dropped = 0
-- XACK takes many ids: a few calls per batch instead of one per entry. Lua's unpack is bounded by
-- its stack (8,000 values by default), hence the chunks.
local ACK_CHUNK = 1000

local function ack_all(ids)
  for first = 1, #ids, ACK_CHUNK do
    local last = math.min(first + ACK_CHUNK - 1, #ids)
    redis.call('XACK', KEYS[1], group, unpack(ids, first, last))
  end
end

-- Stream ids compare as (milliseconds, sequence) numbers, not as strings ('9-0' < '10-0').
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq), ms, seq
end

local function id_below(a, b)
  local a_ms, a_seq = id_parts(a)
  local b_ms, b_seq = id_parts(b)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

-- The id just after this one: XTRIM MINID keeps its argument, and the last delivered entry may go.
-- (A sequence too long for a Lua number is not incremented: that entry is kept, which is safe.)
local function next_id(id)
  local _, _, ms, seq = id_parts(id)
  if #seq > 15 then
    return id
  end
  return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end

-- Settled entries leave the stream in bulk, one XTRIM per call instead of one XDEL per entry (an
-- XDEL seeks its entry inside a node of up to 100; a trim drops whole nodes). Below the trim point
-- every entry is certainly settled: it is at or before the group's last delivered id (delivered;
-- entries are delivered in id order) and before the oldest entry still pending (so acknowledged).
-- A pending entry - in a batch in flight, or a dead gateway's waiting for XAUTOCLAIM - and an entry
-- never delivered stay. "~" drops whole nodes only, leaving settled entries that share a node with
-- the trim point for a later call: cheaper, and the depth gauge counts from the group, not XLEN.
-- There is one group on the outbox (the gateways'): a trim would not wait for another.
local function trim_settled(stream)
  local info = group_info(stream, group)
  if info == nil then
    return
  end
  local trim_to = next_id(info['last-delivered-id'])
  local pending = redis.call('XPENDING', stream, group)
  local oldest_pending = pending[2]
  if oldest_pending and id_below(oldest_pending, trim_to) then
    trim_to = oldest_pending
  end
  redis.call('XTRIM', stream, 'MINID', '~', trim_to)
end

local function current(parcel, kind, version)
  local fields = redis.call('HMGET', parcel, 'nv:' .. kind, 'n:' .. kind)
  return fields[1] == version and fields[2] ~= false
end

while a <= #ops do
  local op = ops[a]
  if op == 'rec' then
    local parcel, field = KEYS[k], 'a:' .. ops[a + 1]
    -- A parcel removed after retention is not brought back by a late outcome. Most notices record
    -- their kind's first attempt: HSETNX writes it in the one scan of the hash that HSET would make,
    -- and only a field already there is read and written again (HGET + HSET).
    if redis.call('EXISTS', parcel) == 1 and redis.call('HSETNX', parcel, field, ops[a + 2]) == 0 then
      redis.call('HSET', parcel, field, redis.call('HGET', parcel, field) .. ops[a + 2])
    end
    k = k + 1
    a = a + 3
  elseif op == 'told' then
    -- The slot the recipient read (ops: version, Slot bytes, recipient id): kept while it is the
    -- newest, and the parcel's version bumped so an engine plan that read the hash before conflicts
    -- and plans from it (engine.state: what the recipient was told is what was sent, not claimed).
    local parcel, version = KEYS[k], tonumber(ops[a + 1])
    if redis.call('EXISTS', parcel) == 1 and version > tonumber(redis.call('HGET', parcel, 'tv') or '0') then
      redis.call('HSET', parcel, 'tv', version, 'ts', ops[a + 2], 'tr', ops[a + 3])
      redis.call('HINCRBY', parcel, 'v', 1)
    end
    k = k + 1
    a = a + 4
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
    if current(parcel, ops[a + 1], ops[a + 2]) then
      redis.call('HSET', parcel, 'n:' .. ops[a + 1], ops[a + 5])
      -- A new parcel version: an engine re-plan that read the body before this write conflicts and
      -- reads it again, instead of writing back the attempts and channels it read (engine.state).
      redis.call('HINCRBY', parcel, 'v', 1)
      due_add(KEYS[2], ops[a + 4], ops[a + 3])
    else
      dropped = dropped + 1
    end
    k = k + 1
    a = a + 6
  elseif op == 'dlq' then
    local parcel = KEYS[k]
    if current(parcel, ops[a + 1], ops[a + 2]) then
      redis.call('XADD', KEYS[3], '*', 'n', ops[a + 3], 'reason', ops[a + 4], 'at', now)
      dead_lettered = true
    else
      dropped = dropped + 1
    end
    k = k + 1
    a = a + 5
  elseif op == 'dlqdel' then
    redis.call('XDEL', KEYS[3], ops[a + 1])
    a = a + 2
  elseif op == 'incr' then
    redis.call('HINCRBY', KEYS[k], ops[a + 1], ops[a + 2])
    k = k + 1
    a = a + 3
  elseif op == 'pexp' then
    redis.call('PEXPIRE', KEYS[k], ops[a + 1])
    k = k + 1
    a = a + 2
  else
    return redis.error_reply('settle: unknown op ' .. tostring(op))
  end
end
-- Dead letters older than their retention go when a new one comes: the stream needs no sweeper, and
-- one that receives nothing new holds nothing newer than before. Its ids are Redis's clock ('*'),
-- so the cut is too (not the gateway's). Exact, not "~": dead letters are few, and an operator
-- listing them should not find one past its retention.
if dead_lettered and dead_letter_retention_ms > 0 then
  local time = redis.call('TIME')
  local cut_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - dead_letter_retention_ms
  redis.call('XTRIM', KEYS[3], 'MINID', string.format('%d', cut_ms))
end
if #acked > 0 then
  ack_all(acked)
  trim_settled(KEYS[1])
end
publish_wake(ARGV[7])
return dropped
