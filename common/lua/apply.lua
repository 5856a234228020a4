-- Apply the planned changes of one shard's parcels atomically, each under an optimistic check.
-- KEYS[1] = the shard's due set; KEYS[2..ARGV[2]+1] = parcel hashes; the rest = counter hashes.
-- ARGV[2] = the number of parcels.
-- ARGV[1] = the items, one MessagePack array (Redis's cmsgpack unpacks it in C: a Lua step per item
-- cost more than the rest of the script). Per parcel in KEYS order, a header of 8 numbers then its
-- lists:
--   expected version (string), ttl_ms (> 0: PEXPIRE; 0: keep the key's TTL), nchk, nset, ndel,
--   nadd, nrem, ninc,
--   nchk due members that must still be pending (the engine replaces or withdraws them),
--   nset field/value pairs for HSET (the new `v` among them),
--   ndel fields for HDEL,
--   nadd score/member pairs for ZADD on the due set,
--   nrem members for ZREM from the due set,
--   ninc counter increments, 4 items each: KEYS index, field, amount, ttl_ms (> 0: PEXPIRE, when
--   the hash is new) for HINCRBY: the parcel's daily counters, written with the marker that says
--   they were counted.
--   The applied parcels' increments are summed first and written once per counter field at the end
--   (a batch's parcels mostly count into the same few hashes): fewer calls, same totals.
-- The applied parcels' due-set moves are gathered and made at the end too, one ZADD and one ZREM for
-- the call: each member names its own parcel, so no later parcel's check can see them, and in Redis a
-- call from a script costs more than the work of a member.
-- A parcel whose version moved, or one of whose checked notices was claimed meanwhile, is left
-- untouched and its position (1-based) returned: the caller re-reads and re-plans only those.
local items = cmsgpack.unpack(ARGV[1])
local at = 1 -- the next item

local due = KEYS[1]
local conflicts = {}
local adds, rems, nadds, nrems = {}, {}, 0, 0 -- due-set moves of the applied parcels
local sums, fields, ttls = {}, {}, {} -- counter key index -> field -> amount; field order; ttl_ms
for i = 2, tonumber(ARGV[2]) + 1 do
  local key = KEYS[i]
  local expected, ttl = items[at], items[at + 1]
  local nchk, nset, ndel = items[at + 2], 2 * items[at + 3], items[at + 4]
  local nadd, nrem, ninc = 2 * items[at + 5], items[at + 6], 4 * items[at + 7]
  local chk = at + 8
  local set = chk + nchk
  local del = set + nset
  local add = del + ndel
  local rem = add + nadd
  local inc = rem + nrem
  at = inc + ninc
  local ok = (redis.call('HGET', key, 'v') or '0') == expected
  if ok and nchk > 0 then
    local scores = redis.call('ZMSCORE', due, unpack(items, chk, set - 1))
    for j = 1, nchk do
      if not scores[j] then
        ok = false
        break
      end
    end
  end
  if ok then
    if nset > 0 then redis.call('HSET', key, unpack(items, set, del - 1)) end
    if ndel > 0 then redis.call('HDEL', key, unpack(items, del, add - 1)) end
    for j = add, rem - 1 do
      nadds = nadds + 1
      adds[nadds] = items[j]
    end
    for j = rem, inc - 1 do
      nrems = nrems + 1
      rems[nrems] = items[j]
    end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    for j = inc, at - 1, 4 do
      local counter = items[j]
      local by_field = sums[counter]
      if by_field == nil then
        by_field = {}
        sums[counter], fields[counter] = by_field, {}
      end
      local name = items[j + 1]
      if by_field[name] == nil then
        by_field[name] = 0
        table.insert(fields[counter], name)
      end
      by_field[name] = by_field[name] + items[j + 2]
      ttls[counter] = math.max(ttls[counter] or 0, items[j + 3])
    end
  else
    conflicts[#conflicts + 1] = i - 1
  end
end
-- In slices: Lua's unpack fails past a few thousand values (an even size keeps ZADD's pairs whole).
local SLICE = 4000
for from = 1, nadds, SLICE do
  redis.call('ZADD', due, unpack(adds, from, math.min(from + SLICE - 1, nadds)))
end
for from = 1, nrems, SLICE do
  redis.call('ZREM', due, unpack(rems, from, math.min(from + SLICE - 1, nrems)))
end
for counter, by_field in pairs(sums) do
  local key = KEYS[counter]
  -- A counter hash's TTL is set when it is made: a field that ends at exactly what was added is new
  -- (counts only grow), and a new hash has only new fields.
  local made = false
  for _, name in ipairs(fields[counter]) do
    local amount = by_field[name]
    if redis.call('HINCRBY', key, name, amount) == amount then made = true end
  end
  if made and ttls[counter] > 0 then redis.call('PEXPIRE', key, ttls[counter]) end
end
return conflicts
