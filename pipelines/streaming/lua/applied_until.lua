-- EventBus.applied_until on Redis Streams (scripts.APPLIED_UNTIL; prelude stream_helpers.lua),
-- read atomically on the Redis server clock (stream ids are Redis ms too): the time before which
-- every entry of the stream has been acknowledged by the group (applied or dead-lettered), i.e.
-- min(now, the oldest entry not yet delivered to the group, the oldest entry pending in it).
-- Entries trimmed before delivery are not waited for (EventBus.skip_trimmed reports them).
-- Returns that time in integer ms, or nil when the stream or the group does not exist.
local stream = unpack(KEYS)
local group = unpack(ARGV)
local now = redis.call('TIME')
local t = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local g = group_info(stream, group)
if not g then return nil end
local last = g['last-delivered-id']
local undelivered = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
if #undelivered > 0 then t = math.min(t, (id_parts(undelivered[1][1]))) end
local oldest = redis.call('XPENDING', stream, group, '-', '+', 1)  -- O(1), unlike the summary form
if #oldest > 0 then t = math.min(t, (id_parts(oldest[1][1]))) end
return t
