-- Read the parcels of one shard for planning, in one call.
-- KEYS[1] = the shard's due set; KEYS[2..] = parcel hashes.
-- ARGV[i-1] = the parcel id of KEYS[i].
-- Returns, per parcel, {version or false, state bytes or false, pending kinds, alert mark or false,
-- counted markers or false}: the kinds listed in
-- the hash's `q` field (what the engine scheduled) whose notice is still in the due set, joined by
-- ','. A scheduled kind missing from the due set was claimed by the scheduler: it went out.
local due = KEYS[1]
local out = {}
for i = 2, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'v', 's', 'q', 'am', 'ct')
  local pending = {}
  if row[3] then
    local prefix = ARGV[i - 1] .. ':'
    for kind in string.gmatch(row[3], '[^,]+') do
      if redis.call('ZSCORE', due, prefix .. kind) then
        pending[#pending + 1] = kind
      end
    end
  end
  out[#out + 1] = row[1]
  out[#out + 1] = row[2]
  out[#out + 1] = table.concat(pending, ',')
  out[#out + 1] = row[4]
  out[#out + 1] = row[5]
end
return out
