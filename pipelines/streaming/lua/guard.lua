-- Prelude of the stream processor's per-event scripts (social.lua, graph_edge.lua), concatenated
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

-- mark_seen(key, ttl): false if the event's seen marker exists (a redelivery: the script changes
-- nothing and returns 0), else set it with TTL ttl (s) and return true.
local function mark_seen(key, ttl)
  if redis.call('EXISTS', key) == 1 then return false end
  redis.call('SET', key, '1', 'EX', ttl)
  return true
end
