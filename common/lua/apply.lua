-- Apply the planned changes of one shard's parcels atomically, each under an optimistic check.
-- KEYS[1] = the shard's due set; KEYS[2..ARGV[2]+1] = parcel hashes; the rest = counter hashes.
-- ARGV[2] = the number of parcels.
-- ARGV[1] = one blob of items: their count and each one's length (4-byte big-endian numbers), then
-- the items' bytes back to back. One argument instead of dozens per parcel, because packing each
-- argument costs the client more than the whole script costs Redis. Per parcel in KEYS order, a
-- header of 8 numbers then its lists:
--   expected version, ttl_ms (> 0: PEXPIRE), nchk, nset, ndel, nadd, nrem, ninc,
--   nchk due members that must still be pending (the engine replaces or withdraws them),
--   nset field/value pairs for HSET (the new `v` among them),
--   ndel fields for HDEL,
--   nadd score/member pairs for ZADD on the due set,
--   nrem members for ZREM from the due set,
--   ninc counter increments, 4 items each: KEYS index, field, amount, ttl_ms (> 0: PEXPIRE) for
--   HINCRBY: the parcel's daily counters, written with the marker that says they were counted.
--   The applied parcels' increments are summed first and written once per counter field at the end
--   (a batch's parcels mostly count into the same few hashes): fewer calls, same totals.
-- A parcel whose version moved, or one of whose checked notices was claimed meanwhile, is left
-- untouched and its position (1-based) returned: the caller re-reads and re-plans only those.
local blob = ARGV[1]
local total = struct.unpack('>I4', blob, 1)
local size_at = 5 -- where the next item's length is
local pos = 5 + 4 * total -- where the next item's bytes are
local function take(count)
  local items = {}
  for j = 1, count do
    local size = struct.unpack('>I4', blob, size_at)
    size_at = size_at + 4
    items[j] = string.sub(blob, pos, pos + size - 1)
    pos = pos + size
  end
  return items
end

local due = KEYS[1]
local conflicts = {}
local sums, fields, ttls = {}, {}, {} -- counter key index -> field -> amount; field order; ttl_ms
for i = 2, tonumber(ARGV[2]) + 1 do
  local key = KEYS[i]
  local head = take(8)
  local expected = head[1]
  local ttl = tonumber(head[2])
  local chk = take(tonumber(head[3]))
  local set = take(2 * tonumber(head[4]))
  local del = take(tonumber(head[5]))
  local add = take(2 * tonumber(head[6]))
  local rem = take(tonumber(head[7]))
  local inc = take(4 * tonumber(head[8]))
  local ok = (redis.call('HGET', key, 'v') or '0') == expected
  if ok and #chk > 0 then
    local scores = redis.call('ZMSCORE', due, unpack(chk))
    for j = 1, #chk do
      if not scores[j] then
        ok = false
        break
      end
    end
  end
  if ok then
    if #set > 0 then redis.call('HSET', key, unpack(set)) end
    if #del > 0 then redis.call('HDEL', key, unpack(del)) end
    if #add > 0 then redis.call('ZADD', due, unpack(add)) end
    if #rem > 0 then redis.call('ZREM', due, unpack(rem)) end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    for j = 1, #inc, 4 do
      local counter = inc[j]
      local by_field = sums[counter]
      if by_field == nil then
        by_field = {}
        sums[counter], fields[counter] = by_field, {}
      end
      local name = inc[j + 1]
      if by_field[name] == nil then
        by_field[name] = 0
        table.insert(fields[counter], name)
      end
      by_field[name] = by_field[name] + tonumber(inc[j + 2])
      ttls[counter] = math.max(ttls[counter] or 0, tonumber(inc[j + 3]))
    end
  else
    conflicts[#conflicts + 1] = i - 1
  end
end
for counter, by_field in pairs(sums) do
  local key = KEYS[tonumber(counter)]
  for _, name in ipairs(fields[counter]) do
    redis.call('HINCRBY', key, name, by_field[name])
  end
  if ttls[counter] > 0 then redis.call('PEXPIRE', key, ttls[counter]) end
end
return conflicts
