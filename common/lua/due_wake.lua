-- Included by the scripts that add to a due set (`-- #include due_wake`): the scheduler's dispatcher
-- sleeps until the earliest due time it knows, so a script that adds a member due earlier must wake
-- it. `due_add` is the ZADD of one member, remembering the earliest score added; `publish_wake`,
-- called once at the end, publishes that score (unix ms, decimal) on the wake-up channel
-- (`keys.SCHEDULER_WAKE_CHANNEL`, passed in by the caller), and nothing when nothing was added.
local wake_ms = nil

local function due_add(due, score, member)
  redis.call('ZADD', due, score, member)
  local ms = tonumber(score)
  if wake_ms == nil or ms < wake_ms then
    wake_ms = ms
  end
end

local function publish_wake(channel)
  if wake_ms ~= nil then
    redis.call('PUBLISH', channel, string.format('%d', math.floor(wake_ms)))
  end
end
