#!lua flags=no-writes,allow-cross-slot-keys
-- hmget_groups.lua for one node of a Redis Cluster (FeastLayoutFeatureHydrator._read_cluster in
-- feast_layout.py): Feast hashes each key whole, so a request's ~800 keys lie in ~800 slots, and a
-- cluster refuses declared KEYS over many slots. The keys come in ARGV instead, all owned by the
-- node the call is sent to; `allow-cross-slot-keys` (Redis 7.0 script flags) lets one script read
-- them. A key this node does not own (a slot moved since the client's slot map) fails the call
-- with an error, and the hydrator falls back to slot-routed HMGETs.
--   ARGV: the number of groups, then per group: its number of keys, its number of fields, the
--         fields, the keys
-- Returns per key, per field the value (flat, row-major); a missing key or field is a nil reply.
local out, n, a = {}, 0, 2
for _ = 1, tonumber(ARGV[1]) do
  local nkeys, nf = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local fields = {unpack(ARGV, a + 2, a + 1 + nf)}
  a = a + 2 + nf
  for _ = 1, nkeys do
    local v = redis.call('HMGET', ARGV[a], unpack(fields))
    a = a + 1
    for j = 1, nf do n = n + 1; out[n] = v[j] end
  end
end
return out
