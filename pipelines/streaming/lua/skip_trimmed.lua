-- EventBus.skip_trimmed on Redis Streams (scripts.SKIP_TRIMMED; prelude stream_helpers.lua).
-- Trimming removes entries from the front, so entries were lost to the group iff its
-- last-delivered id is before the first retained entry and entries-added - entries-read
-- (undelivered) exceeds the retained length (all undelivered). Then: one dead letter naming the gap
-- and the group's read counter corrected, atomically. Returns the number of entries lost.
local stream, dead_letters = unpack(KEYS)
local group, topic = unpack(ARGV)
local info = redis.pcall('XINFO', 'STREAM', stream)
if info['err'] then return 0 end
local s = {}
for i = 1, #info, 2 do s[info[i]] = info[i + 1] end
if (not s['entries-added']) or s['length'] == 0 then return 0 end
local first = s['first-entry'][1]
local g = group_info(stream, group)
if (not g) or (not g['entries-read']) or (not id_before(g['last-delivered-id'], first)) then return 0 end
local last = g['last-delivered-id']
local lost = s['entries-added'] - g['entries-read'] - s['length']
if lost <= 0 then return 0 end
redis.call('XGROUP', 'SETID', stream, group, last, 'ENTRIESREAD', s['entries-added'] - s['length'])
redis.call('XADD', dead_letters, '*', 'reason', lost .. ' entries were trimmed from the stream (MAXLEN) before the group read them; payloads lost',
           'original_topic', topic, 'original_id', last .. '..' .. first, 'group', group)
return lost
