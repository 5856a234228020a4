-- One page of alert index entries of one shard, merged over the index keys the filters select.
-- Members are "<inverted opened ms>|<alert id>" with score 0, so lexicographic order is newest
-- first and a member is an exact cursor, ties included.
-- KEYS = index keys (one shard); ARGV[1] = the last member of the previous page ('' for the first
-- page), ARGV[2] = page size. Returns at most that many members, in order.
local start = '-'
if ARGV[1] ~= '' then
  start = '(' .. ARGV[1]
end
local count = tonumber(ARGV[2])
local all = {}
for i = 1, #KEYS do
  local got = redis.call('ZRANGEBYLEX', KEYS[i], start, '+', 'LIMIT', 0, count)
  for _, member in ipairs(got) do
    all[#all + 1] = member
  end
end
table.sort(all)
local page = {}
for i = 1, math.min(count, #all) do
  page[i] = all[i]
end
return page
