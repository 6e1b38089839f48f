-- Apply one half of a SocialGraphEvent to the social graph (scripts.GRAPH_EDGE; prelude guard.lua).
-- Every key belongs to ONE user (hash tag {u:<user>}): the script runs once on the actor
-- (side 'out': the user who follows / unfollows / blocks) and once on the other user (side 'in'),
-- so each run touches one Redis Cluster slot. Each half has its own seen marker, so a redelivered
-- event, or one whose other half failed, applies each half exactly once.
-- An action older than the last applied edge action of the pair on this side is stale (out of
-- order) and ignored. A block removes both directions (the blocked user no longer follows the
-- blocker either, as on Twitter). Returns 0 (applied before), 1 (applied now) or 2 (stale).
local seen, edge_ts, followees, followers = unpack(KEYS)
local seen_ttl, side, action, other_id, event_ts = unpack(ARGV)

local bad = guard_key_types({'string', 'hash', 'set', 'set'})
if bad then return bad end
if not mark_seen(seen, seen_ttl) then return 0 end

local ets = tonumber(event_ts)
local field = side .. ':' .. other_id
local last = redis.call('HGET', edge_ts, field)
if last and tonumber(last) > ets then return 2 end
redis.call('HSET', edge_ts, field, event_ts)
if action == 'block' then
  -- both directions between the two users end; the reverse edge's time moves too (if not newer)
  local reverse = (side == 'out' and 'in' or 'out') .. ':' .. other_id
  local lr = redis.call('HGET', edge_ts, reverse)
  if (not lr) or tonumber(lr) <= ets then redis.call('HSET', edge_ts, reverse, event_ts) end
  redis.call('SREM', followees, other_id)
  redis.call('SREM', followers, other_id)
elseif side == 'out' then
  -- this user follows / unfollows other_id
  if action == 'follow' then redis.call('SADD', followees, other_id)
  elseif action == 'unfollow' then redis.call('SREM', followees, other_id) end
else
  -- other_id follows / unfollows this user
  if action == 'follow' then redis.call('SADD', followers, other_id)
  elseif action == 'unfollow' then redis.call('SREM', followers, other_id) end
end
return 1
