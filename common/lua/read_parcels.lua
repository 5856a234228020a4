-- #include pending_kinds
-- Read the parcels of one shard for planning, in one call.
-- KEYS[1] = the shard's due set; KEYS[2..] = parcel hashes.
-- ARGV[1] = '1' to read the pending notices' bodies too, else '0'; ARGV[i] = the parcel id of KEYS[i].
-- Returns, per parcel, {version or false, state bytes or false, pending kinds (see pending_kinds),
-- alert mark or false, counted markers or false, the slot last sent or false, its recipient or
-- false (see settle.lua's `told`)}, followed when asked by the bodies of its pending
-- kinds, in their order (false where none): a re-plan of the same notice keeps what the gateway
-- wrote back into its body (attempts, failed channels, backoff). Only re-plans ask: ingest reads no
-- bodies.
local due = KEYS[1]
local with_bodies = ARGV[1] == '1'
local out = {}
for i = 2, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'v', 's', 'q', 'am', 'ct', 'ts', 'tr')
  local pending = pending_kinds(due, ARGV[i], row[3])
  out[#out + 1] = row[1]
  out[#out + 1] = row[2]
  out[#out + 1] = pending
  out[#out + 1] = row[4]
  out[#out + 1] = row[5]
  out[#out + 1] = row[6]
  out[#out + 1] = row[7]
  if with_bodies then
    local fields = {}
    for kind in string.gmatch(pending, '[^,]+') do
      fields[#fields + 1] = 'n:' .. kind
    end
    out[#out + 1] = #fields > 0 and redis.call('HMGET', KEYS[i], unpack(fields)) or {}
  end
end
return out
