-- Included by the outbox scripts (`-- #include group_info`): a consumer group of a stream as
-- XINFO GROUPS reports it, a table of its fields (name, pending, last-delivered-id, and lag on
-- Redis 7), or nil when the stream or the group is not there.
local function group_info(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if groups.err then
    return nil
  end
  for _, entry in ipairs(groups) do
    local fields = {}
    for i = 1, #entry, 2 do
      fields[entry[i]] = entry[i + 1]
    end
    if fields['name'] == group then
      return fields
    end
  end
  return nil
end
