-- Apply the planned changes of one shard's parcels atomically, each under an optimistic check.
-- KEYS[1] = the shard's due set; KEYS[2..] = parcel hashes.
-- ARGV, per parcel in KEYS order, a header of 7 numbers then its lists:
--   expected version, ttl_ms (> 0: PEXPIRE), nchk, nset, ndel, nadd, nrem,
--   nchk due members that must still be pending (the engine replaces or withdraws them),
--   nset field/value pairs for HSET (the new `v` among them),
--   ndel fields for HDEL,
--   nadd score/member pairs for ZADD on the due set,
--   nrem members for ZREM from the due set.
-- A parcel whose version moved, or one of whose checked notices was claimed meanwhile, is left
-- untouched and its position (1-based) returned: the caller re-reads and re-plans only those.
local due = KEYS[1]
local conflicts = {}
local a = 1
for i = 2, #KEYS do
  local key = KEYS[i]
  local expected = ARGV[a]
  local ttl = tonumber(ARGV[a + 1])
  local nchk = tonumber(ARGV[a + 2])
  local nset = tonumber(ARGV[a + 3])
  local ndel = tonumber(ARGV[a + 4])
  local nadd = tonumber(ARGV[a + 5])
  local nrem = tonumber(ARGV[a + 6])
  a = a + 7
  local chk = a
  local set = chk + nchk
  local del = set + 2 * nset
  local add = del + ndel
  local rem = add + 2 * nadd
  a = rem + nrem
  local ok = (redis.call('HGET', key, 'v') or '0') == expected
  if ok then
    for j = chk, chk + nchk - 1 do
      if not redis.call('ZSCORE', due, ARGV[j]) then
        ok = false
        break
      end
    end
  end
  if ok then
    if nset > 0 then redis.call('HSET', key, unpack(ARGV, set, set + 2 * nset - 1)) end
    if ndel > 0 then redis.call('HDEL', key, unpack(ARGV, del, del + ndel - 1)) end
    if nadd > 0 then redis.call('ZADD', due, unpack(ARGV, add, add + 2 * nadd - 1)) end
    if nrem > 0 then redis.call('ZREM', due, unpack(ARGV, rem, rem + nrem - 1)) end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  else
    conflicts[#conflicts + 1] = i - 1
  end
end
return conflicts
