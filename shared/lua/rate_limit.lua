-- Fixed-window rate limit for several requests at once. KEYS[i]: rl:{site}:{ip}:{window index};
-- ARGV[3i-2]: units asked (a batch asks for all its events at once), ARGV[3i-1]: limit,
-- ARGV[3i]: key lifetime in ms. A request is admitted only if all its units fit; a refused request
-- consumes nothing. Reply: {admitted_1 (1/0), ...}.
local out = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + n > limit then
    out[i] = 0
  else
    if redis.call('INCRBY', KEYS[i], n) == n then
      redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[3 * i]))
    end
    out[i] = 1
  end
end
return out
