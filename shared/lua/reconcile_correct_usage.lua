-- Drift correction (SPEC §8): add ARGV[1] (pg - observed) to the usage counter KEYS[1] only if it
-- exists. A delta, not a SET, so reservations and releases landing between the read and this call are
-- kept; a missing counter stays missing (the gateway seeds it exactly from Postgres). Returns the new
-- value, or false when the key is missing.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
return redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))
