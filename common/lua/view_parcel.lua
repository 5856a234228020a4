-- #include pending_kinds
-- GetParcel's read of one parcel, in one call.
-- KEYS[1] = the shard's due set, KEYS[2] = the parcel hash, KEYS[3] = the parcel's alert hash.
-- ARGV[1] = the parcel id; ARGV[2..] = the gateway's attempts fields to return (one per notice kind).
-- Returns false for an unknown parcel, else {version, state bytes, {kind, due score, ...} of the
-- scheduled kinds still waiting in the due set, {the attempts fields' values, false where absent},
-- the alert hash as HGETALL gives it}. The due scores, not only which kinds wait: the gateway moves a
-- notice it could not send yet (a rate limit, a slow provider) to a later time there, and GetParcel
-- shows when it will go. Not the whole parcel hash: it also holds the notice bodies, which GetParcel
-- does not show.
local row = redis.call('HMGET', KEYS[2], 'v', 's', 'q', unpack(ARGV, 2))
if not row[1] then return false end
local attempts = {}
for i = 4, #row do attempts[i - 3] = row[i] end
local waiting = {}
local kinds, scores = due_scores(KEYS[1], ARGV[1], row[3])
if kinds then
  for j = 1, #kinds do
    if scores[j] then
      waiting[#waiting + 1] = kinds[j]
      waiting[#waiting + 1] = scores[j]
    end
  end
end
return {row[1], row[2], waiting, attempts, redis.call('HGETALL', KEYS[3])}
