-- Included by the read scripts (`-- #include pending_kinds`): which of a parcel's scheduled notice
-- kinds are still waiting in the due set.
-- `scheduled` is the parcel hash's `q` field (the kinds the engine scheduled, joined by ','), or
-- false. Returns the kinds whose notice is still in `due`, joined by ','. A scheduled kind missing
-- from the due set was claimed by the scheduler: it went out.
local function pending_kinds(due, parcel_id, scheduled)
  if not scheduled then return '' end
  local prefix = parcel_id .. ':'
  local kinds, members = {}, {}
  for kind in string.gmatch(scheduled, '[^,]+') do
    kinds[#kinds + 1] = kind
    members[#members + 1] = prefix .. kind
  end
  if #members == 0 then return '' end
  -- One ZMSCORE for all of the parcel's kinds (Redis >= 6.2): a call costs more than its work.
  local scores = redis.call('ZMSCORE', due, unpack(members))
  local pending = {}
  for j = 1, #kinds do
    if scores[j] then pending[#pending + 1] = kinds[j] end
  end
  return table.concat(pending, ',')
end
