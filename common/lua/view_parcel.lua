-- #include pending_kinds
-- GetParcel's read of one parcel, in one call.
-- KEYS[1] = the shard's due set, KEYS[2] = the parcel hash, KEYS[3] = the parcel's alert hash.
-- ARGV[1] = the parcel id; ARGV[2..] = the gateway's attempts fields to return (one per notice kind).
-- Returns false for an unknown parcel, else {version, state bytes, pending kinds (see
-- pending_kinds), {the attempts fields' values, false where absent}, the alert hash as HGETALL
-- gives it}. Not the whole parcel hash: it also holds the notice bodies, which GetParcel does not show.
local row = redis.call('HMGET', KEYS[2], 'v', 's', 'q', unpack(ARGV, 2))
if not row[1] then return false end
local attempts = {}
for i = 4, #row do attempts[i - 3] = row[i] end
return {row[1], row[2], pending_kinds(KEYS[1], ARGV[1], row[3]), attempts, redis.call('HGETALL', KEYS[3])}
