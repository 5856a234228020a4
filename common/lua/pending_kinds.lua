-- Included by the read scripts (`-- #include pending_kinds`): which of a parcel's scheduled notice
-- kinds are still waiting in the due set.
-- `scheduled` is the parcel hash's `q` field (the kinds the engine scheduled, joined by ','), or
-- false. A scheduled kind missing from the due set was claimed by the scheduler: it went out.

-- The scheduled kinds and their due scores (false where the kind is no longer due), or nil when
-- none is scheduled.
local function due_scores(due, parcel_id, scheduled)
  if not scheduled then return nil end
  local prefix = parcel_id .. ':'
  local kinds, members = {}, {}
  for kind in string.gmatch(scheduled, '[^,]+') do
    kinds[#kinds + 1] = kind
    members[#members + 1] = prefix .. kind
  end
  if #members == 0 then return nil end
  -- One ZMSCORE for all of the parcel's kinds (Redis >= 6.2): a call costs more than its work.
  return kinds, redis.call('ZMSCORE', due, unpack(members))
end

-- The kinds whose notice is still in `due`, joined by ','.
local function pending_kinds(due, parcel_id, scheduled)
  local kinds, scores = due_scores(due, parcel_id, scheduled)
  if not kinds then return '' end
  local pending = {}
  for j = 1, #kinds do
    if scores[j] then pending[#pending + 1] = kinds[j] end
  end
  return table.concat(pending, ',')
end
