-- Remove entries of a recipient's parcel index (`engine.recipient_index`) that still hold the value
-- they were read with: a parcel id registered again since (a new value) stays.
-- KEYS[1] = the index hash; ARGV = parcel id, value, parcel id, value, ...
-- Returns how many entries were removed.
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return removed
