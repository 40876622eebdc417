-- Give back reservations of events that ended uncaptured (SPEC §5). KEYS[i] usage counters,
-- ARGV[i] how many to release. A counter that vanished meanwhile is left missing (it is re-seeded
-- exactly from Postgres), never created negative.
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('DECRBY', KEYS[i], tonumber(ARGV[i]))
  end
end
return {#KEYS}
