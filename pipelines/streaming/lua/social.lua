-- Apply one SocialGraphEvent (follow / unfollow / block / mute) atomically (scripts.SOCIAL; prelude
-- guard.lua). An older action than the last applied one of the same family (follow/unfollow,
-- block, mute) for the pair is stale (arrived out of order) and ignored; a block also counts as the
-- latest follow action. Returns 0 (applied before), 1 (applied now) or 2 (stale).
local seen, social_ts, follows, blocked, muted = unpack(KEYS)
local seen_ttl, action, author_id, event_ts = unpack(ARGV)

-- one type per key above, in order
local bad = guard_key_types({'string', 'hash', 'set', 'set', 'set'})
if bad then return bad end
if not mark_seen(seen, seen_ttl) then return 0 end

local ets = tonumber(event_ts)
local family = action
if action == 'unfollow' then family = 'follow' end
local last = redis.call('HGET', social_ts, family .. ':' .. author_id)
if last and tonumber(last) > ets then return 2 end
redis.call('HSET', social_ts, family .. ':' .. author_id, event_ts)
if action == 'follow' then redis.call('SADD', follows, author_id)
elseif action == 'unfollow' then redis.call('SREM', follows, author_id)
elseif action == 'block' then
  redis.call('SADD', blocked, author_id)
  local lf = redis.call('HGET', social_ts, 'follow:' .. author_id)
  if (not lf) or tonumber(lf) <= ets then
    redis.call('SREM', follows, author_id)
    redis.call('HSET', social_ts, 'follow:' .. author_id, event_ts)
  end
elseif action == 'mute' then redis.call('SADD', muted, author_id)
end
return 1
