-- #include pending_kinds
-- Read the parcels of one shard for planning, in one call.
-- KEYS[1] = the shard's due set; KEYS[2..] = parcel hashes.
-- ARGV[i-1] = the parcel id of KEYS[i].
-- Returns, per parcel, {version or false, state bytes or false, pending kinds (see pending_kinds),
-- alert mark or false, counted markers or false}.
local due = KEYS[1]
local out = {}
for i = 2, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'v', 's', 'q', 'am', 'ct')
  out[#out + 1] = row[1]
  out[#out + 1] = row[2]
  out[#out + 1] = pending_kinds(due, ARGV[i - 1], row[3])
  out[#out + 1] = row[4]
  out[#out + 1] = row[5]
end
return out
