-- Apply one flush of billing counters exactly once (shared/billing_counters.py).
-- KEYS[1] = the counters hash, KEYS[2] = this batch's marker key.
-- ARGV[1] = marker TTL in seconds, then name, amount pairs.
-- A batch whose reply was lost is retried with the same marker: the second run adds nothing.
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
