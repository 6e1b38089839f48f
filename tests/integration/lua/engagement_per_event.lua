-- The per-event engagement script this project ran before engagement_batch.lua (git history:
-- pipelines/streaming/lua/guard.lua + engagement.lua), kept as the reference the batch script must
-- equal: tests/integration/test_stream_batch_script.py applies the same events with both.
-- Prelude of the stream processor's event scripts (engagement.lua, social.lua), concatenated
-- before them at load (pipelines/streaming/scripts.py).
--
-- guard_key_types(want): every KEYS[i] must have the type want[i] or not exist. A Lua script is not
-- rolled back on an error, so every check that can fail runs before the first write and a failure
-- leaves nothing behind, not even the seen marker (the bus entry then stays pending). Returns the
-- error reply for the first key of another type (the script returns it), else nil.
local function guard_key_types(want)
  for i, t in ipairs(want) do
    local got = redis.call('TYPE', KEYS[i])['ok']
    if got ~= 'none' and got ~= t then
      return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. got .. ', expected ' .. t)
    end
  end
  return nil
end

-- mark_seen(key, id, ttl): false if the event's id is in its hour's idempotency set (a
-- redelivery: the script changes nothing and returns 0), else add it, (re)set the set's TTL to ttl
-- (s) and return true. (The former marker, one string key per event, had the same rule.)
local function mark_seen(key, id, ttl)
  if redis.call('SISMEMBER', key, id) == 1 then return false end
  redis.call('SADD', key, id)
  redis.call('EXPIRE', key, ttl)
  return true
end
-- Apply one EngagementEvent to the real-time features, atomically (scripts.ENGAGEMENT; prelude
-- guard.lua). Keys: core/online_layout.py; bucket / decay / trending math: core/realtime.py.
-- Returns 0 if the event was applied before (seen marker), 1 if applied now.
local seen, counts, rt_meta, post_score, author_score, recent_posts, recent_authors, hated, follows,
      social_ts, index_post_meta, trending_posts, trending_tags, coverage, action_sequence = unpack(KEYS)
local seen_ttl, kind, bucket_start, event_ts, write_ts, weight, post_id, author_id, positive, engaged,
      half_life, counts_ttl, score_ttl, recent_cap, retention_s, bucket_s, trending_half_life,
      trending_cap, out_of_order_s, sequence_cap, event_id = unpack(ARGV)

-- one type per key above, in order
local bad = guard_key_types({'set', 'hash', 'hash', 'hash', 'hash', 'zset', 'zset', 'set', 'set',
                             'hash', 'hash', 'zset', 'zset', 'hash', 'zset'})
if bad then return bad end
if not mark_seen(seen, event_id, seen_ttl) then return 0 end

local bucket = tonumber(bucket_start)
local ets = tonumber(event_ts)
local w = tonumber(weight)
local half = tonumber(half_life)
local retention = tonumber(retention_s)
local bucket_len = tonumber(bucket_s)
local prev = redis.call('HGET', rt_meta, 'last_event_ts')
local newest = ets
if prev and tonumber(prev) > ets then newest = tonumber(prev) end
redis.call('HSET', rt_meta, 'last_event_ts', string.format('%.6f', newest), 'last_write_ts', write_ts)
redis.call('EXPIRE', rt_meta, counts_ttl)
-- a bucket wholly older than the 24 h window of the newest event is dropped, never written; the
-- newest is taken at most a bucket ahead of the processor's clock, so one event from a skewed
-- producer cannot push the post's real buckets out of the window
local horizon = math.min(newest, tonumber(write_ts) + bucket_len) - retention
if bucket + bucket_len > horizon then
  local n = redis.call('HINCRBY', counts, kind .. ':' .. bucket_start, 1)
  if n == 1 then
    -- a new field: prune expired buckets (at most once per kind and bucket, so O(fields) is cheap)
    for _, f in ipairs(redis.call('HKEYS', counts)) do
      local b = tonumber(string.match(f, ':(%-?%d+)$'))
      if b and b + bucket_len <= horizon then redis.call('HDEL', counts, f) end
    end
  end
  redis.call('EXPIRE', counts, counts_ttl)
end
-- the decayed score in fields vf, tf of key, expiring ttl s from now (the post's lives in its counts
-- hash: score_v, score_t, as long as the counts; the author's in its own hash: v, t)
local function decayed_add(key, vf, tf, ttl)
  local cur = redis.call('HMGET', key, vf, tf)
  local v, t = 0.0, ets
  if cur[1] then v = tonumber(cur[1]); t = tonumber(cur[2]) end
  if ets >= t then
    v = v * math.pow(2, -(ets - t) / half) + w
    t = ets
  else
    v = v + w * math.pow(2, -(t - ets) / half)
  end
  redis.call('HSET', key, vf, string.format('%.17g', v), tf, string.format('%.17g', t))
  redis.call('EXPIRE', key, ttl)
end
-- coverage (StreamCoverage): ``newest`` event time, ``first`` (the first event applied) and
-- ``since``, the earliest event time applied that can count in a window: within 24 h of newest and at
-- most out_of_order_s (core.realtime.OUT_OF_ORDER_S) before first, so a lone straggler cannot claim
-- that the stream holds everything back to its time. An event more than a bucket ahead of the
-- processor's clock (a skewed producer) is applied but moves no coverage field.
if ets <= tonumber(write_ts) + bucket_len then
  local cov = redis.call('HMGET', coverage, 'since', 'newest', 'first')
  local gnewest = ets
  if cov[2] and tonumber(cov[2]) > ets then gnewest = tonumber(cov[2]) else redis.call('HSET', coverage, 'newest', event_ts) end
  local first = ets
  if cov[3] then first = tonumber(cov[3]) else redis.call('HSET', coverage, 'first', event_ts) end
  if ets > gnewest - retention and ets >= first - tonumber(out_of_order_s) and ((not cov[1]) or tonumber(cov[1]) > ets) then
    redis.call('HSET', coverage, 'since', event_ts)
  end
end
-- forward decay in log2 space: score = log2(sum_i w_i 2^(t_i / half)), summed with log-sum-exp
local function trending_add(key, member, x)
  local cur = redis.call('ZSCORE', key, member)
  if cur then
    cur = tonumber(cur)
    local hi, lo = math.max(cur, x), math.min(cur, x)
    x = hi + math.log(1 + math.pow(2, lo - hi)) / math.log(2)
  end
  redis.call('ZADD', key, string.format('%.17g', x), member)
  redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(trending_cap) + 1))
end
if w > 0 then
  decayed_add(post_score, 'score_v', 'score_t', counts_ttl)
  decayed_add(author_score, 'v', 't', score_ttl)
  local x = math.log(w) / math.log(2) + ets / tonumber(trending_half_life)
  trending_add(trending_posts, post_id, x)
  local meta = redis.call('HGET', index_post_meta, post_id)
  if meta then
    local tags = string.match(meta, '|([%d,]*)$')
    if tags then
      for tag in string.gmatch(tags, '%d+') do trending_add(trending_tags, tag, x) end
    end
  end
end
if positive == '1' then
  local cap = tonumber(recent_cap)
  redis.call('ZADD', recent_posts, 'GT', ets, post_id)
  redis.call('ZREMRANGEBYRANK', recent_posts, 0, -(cap + 1))
  redis.call('ZADD', recent_authors, 'GT', ets, author_id)
  redis.call('ZREMRANGEBYRANK', recent_authors, 0, -(cap + 1))
end
if engaged == '1' then
  -- the user action sequence (core.online_layout.action_sequence, member encode_action): the index
  -- wrote the history before its cutoff, live engagements are appended here, the newest 2N members
  -- kept (one per post and action: N posts fit)
  redis.call('ZADD', action_sequence, 'GT', ets, post_id .. '|' .. author_id .. '|' .. kind)
  redis.call('ZREMRANGEBYRANK', action_sequence, 0, -(tonumber(sequence_cap) + 1))
end
if kind == 'hate' then redis.call('SADD', hated, author_id) end
if kind == 'follow' then
  -- an engagement "follow" is a follow action: same stale-event rule as social.lua
  local f = 'follow:' .. author_id
  local last = redis.call('HGET', social_ts, f)
  if (not last) or tonumber(last) <= ets then
    redis.call('HSET', social_ts, f, event_ts)
    redis.call('SADD', follows, author_id)
  end
end
return 1
