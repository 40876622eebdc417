-- Reserve quota for groups of new billable events, one group per (site, month) counter.
-- KEYS[i]: usage:{site}:{YYYY-MM}; ARGV[2i-1]: events in the group; ARGV[2i]: the cap (N, or H with
-- soft limits on). All or nothing on missing counters: if any key is missing nothing is reserved and
-- the reply is {0, i...} (the caller seeds those keys from Postgres and retries). Otherwise the reply
-- is {1, used_before_1, ...}: each group reserved min(n, max(0, cap - used_before)) events, which is
-- exactly what shared.quota.events_to_take computes, so the caller derives every event's k from it.
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local missing = {0}
    for j = i, #KEYS do
      if redis.call('EXISTS', KEYS[j]) == 0 then missing[#missing + 1] = j end
    end
    return missing
  end
end
local out = {1}
for i = 1, #KEYS do
  local n = tonumber(ARGV[2 * i - 1])
  local cap = tonumber(ARGV[2 * i])
  local used = tonumber(redis.call('GET', KEYS[i]))
  local take = math.min(n, math.max(0, cap - used))
  if take > 0 then redis.call('INCRBY', KEYS[i], take) end
  out[#out + 1] = used
end
return out
