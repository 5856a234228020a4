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
    local kinds, members = {}, {}
    for kind in string.gmatch(row[3], '[^,]+') do
      kinds[#kinds + 1] = kind
      members[#members + 1] = prefix .. kind
    end
    if #members > 0 then
      -- One ZMSCORE for all of the parcel's kinds (Redis >= 6.2): a call costs more than its work.
      local scores = redis.call('ZMSCORE', due, unpack(members))
      for j = 1, #kinds do
        if scores[j] then pending[#pending + 1] = kinds[j] end
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
