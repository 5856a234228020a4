-- #include due_wake
-- Claim the due notices of one shard: move up to `limit` members due by `now_ms` from the due set to
-- the outbox stream, atomically, so any number of dispatchers may claim the same shard at once and
-- none hands a notice out twice.
-- KEYS[1] = the shard's due set, KEYS[2] = the shard's outbox stream.
-- ARGV[1] = now_ms, ARGV[2] = limit (0: settle only), ARGV[3] = parcel hash key prefix (the key
-- without the parcel id), ARGV[4] = timer kind prefix ("CHECK_"), ARGV[5] = lease end (ms, > now_ms),
-- ARGV[6] = how many timers the caller may take, ARGV[7] = when the due timers beyond those are tried
-- again (ms, > now_ms), ARGV[8] = the wake-up channel, ARGV[9..] = settlements, triples (timer
-- member, its lease end, new score or "" to remove).
-- A member is "<parcel_id>:<KIND>", split at the LAST ':'. Its body is field "n:<KIND>" of the parcel
-- hash; it goes to the outbox as field "n". Nothing else is written: the parcel view reads "no longer
-- in the due set" as queued. A member without a body was withdrawn: it is just removed.
-- A timer member ("<parcel_id>:CHECK_<NAME>") is leased, not removed: its score becomes the lease end
-- and it is handed back to the caller, which runs its handler and settles it in a later call. A
-- caller that dies meanwhile settles nothing, and the timer is due again when the lease ends. Timers
-- beyond what the caller may take are deferred (their score moved on), so they wait in the due set,
-- not in the caller's memory, and hold back no notice behind them.
-- A settlement applies only while the timer still has the score of the lease it settles: a handler
-- that rescheduled its timer, or another dispatcher that took it after the lease ended, keeps its own.
-- The earliest score the call wrote (a settlement's, a lease's, a deferral's) is published on the
-- wake-up channel (see due_wake): the caller learns its next due time from the reply, but another
-- dispatcher of the same shards (one taking over the timers a stopping one hands back due now) would
-- otherwise sleep until its idle limit.
-- Order: every XADD first, then the leases, the removal from the due set last. Redis does not roll
-- back a script that fails midway (e.g. the outbox key holds another type), so this order leaves the
-- members due (or leased), to be claimed again later: at worst a notice reaches the outbox twice,
-- which the gateway's idempotency keys absorb, where removing first would have lost it.
-- Returns {claimed, dropped, next due score or false, deferred, timer members...}.
-- Cost: O(log n + limit) - ZRANGEBYSCORE from -inf returns ranks 0..k-1, removed by rank.
local due, outbox = KEYS[1], KEYS[2]
local now, limit, prefix, timer, lease = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local cap, defer, wake = tonumber(ARGV[6]), ARGV[7], ARGV[8]
for i = 9, #ARGV, 3 do
  local member, leased, after = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local score = redis.call('ZSCORE', due, member)
  if score and tonumber(score) == tonumber(leased) then
    if after == '' then
      redis.call('ZREM', due, member)
    else
      due_add(due, after, member)
    end
  end
end
local claimed, dropped = 0, 0
local reply = {0, 0, false, 0}
local deferred = {}
local members = {}
if limit > 0 then
  members = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)
end
local count = #members
if count > 0 then
  local timer_len = #timer
  for i = 1, count do
    local member = members[i]
    local parcel_id, kind = string.match(member, '^(.*):([^:]*)$')
    if kind == nil then
      dropped = dropped + 1 -- not of our form: nothing to send
    elseif string.sub(kind, 1, timer_len) == timer then
      if #reply - 4 < cap then
        reply[#reply + 1] = member
      else
        deferred[#deferred + 1] = member
      end
    else
      local body = redis.call('HGET', prefix .. parcel_id, 'n:' .. kind)
      if body then
        redis.call('XADD', outbox, '*', 'n', body)
        claimed = claimed + 1
      else
        dropped = dropped + 1
      end
    end
  end
  for i = 5, #reply do
    due_add(due, lease, reply[i])
  end
  for i = 1, #deferred do
    due_add(due, defer, deferred[i])
  end
  reply[4] = #deferred
  -- The leased and deferred timers now score after every member due by now_ms, so the rest of the
  -- batch is still ranks 0..count-timers-1: nothing else runs while the script does.
  local timers = #reply - 4 + #deferred
  if count > timers then
    redis.call('ZREMRANGEBYRANK', due, 0, count - timers - 1)
  end
end
publish_wake(wake)
reply[1], reply[2] = claimed, dropped
local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
if first[2] then reply[3] = first[2] end
return reply
