-- #include group_info
-- The outbox entries of one shard not yet settled: read by no gateway yet, or read and not yet
-- acknowledged. The settle script trims settled entries lazily (whole stream nodes, and never past
-- the oldest pending entry), so XLEN over-counts; the consumer group says what is unsettled.
-- KEYS[1] = outbox:{s}; ARGV[1] = the gateways' consumer group.
local stream, group = KEYS[1], ARGV[1]
local length = redis.call('XLEN', stream)
if length == 0 then
  return 0
end
local info = group_info(stream, group)
if info == nil then
  return length -- no gateway has read this stream yet: every entry waits
end
-- Redis 7 counts the entries added after the group's last delivered one (lag); it says nil when it
-- cannot (entries deleted after that point), and Redis 6.2 does not say at all.
if info['lag'] then
  return info['pending'] + info['lag']
end
-- Otherwise: every entry after the last delivered one, counted as the length minus the entries up
-- to it. Those are the pending ones and settled ones not trimmed yet: the batches in flight, not the
-- backlog, which is what a count the other way round would walk. Read in pages, so a long window
-- (a dead gateway's entries waiting to be reclaimed) does not build one huge reply.
local PAGE = 1000
local last = info['last-delivered-id']
local delivered, from = 0, '-'
while true do
  local page = redis.call('XRANGE', stream, from, last, 'COUNT', PAGE)
  delivered = delivered + #page
  if #page < PAGE then
    break
  end
  from = '(' .. page[#page][1]
end
return info['pending'] + length - delivered
