-- The liveness stamp (scripts.COVERAGE_STAMP): set the coverage hash's ``caught_up`` to
-- ``caught_up`` (s, the bus's EventBus.applied_until), on the Redis server clock. It only moves
-- forward (processors of a group stamp concurrently, each with a value true when it was read), but
-- a value ahead of the server clock (the clock stepped back, a failover) is replaced, not kept.
-- Returns the value written or kept, '%.3f'.
local coverage = unpack(KEYS)
local caught_up = unpack(ARGV)
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local v = tonumber(caught_up)
local cur = redis.call('HGET', coverage, 'caught_up')
if (not cur) or tonumber(cur) < v or tonumber(cur) * 1000 > now_ms then
  redis.call('HSET', coverage, 'caught_up', string.format('%.3f', v))
end
return string.format('%.3f', v)
