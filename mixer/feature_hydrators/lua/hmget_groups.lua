-- HMGET of many hashes in one call, grouped by field list (read-only; FeastLayoutFeatureHydrator._read
-- in feast_layout.py builds KEYS / ARGV). One request's Feast reads are ~800 HMGETs (mostly
-- (user, author) pairs); as one script they cost one command instead of ~800 parsed replies.
--   KEYS: the hashes, group after group
--   ARGV: the number of groups, then per group: its number of keys, its number of fields, the fields
-- Returns per key, per field the value (flat, row-major); a missing key or field is a nil reply.
local out, n, a, k = {}, 0, 2, 0
for _ = 1, tonumber(ARGV[1]) do
  local nkeys, nf = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local fields = {unpack(ARGV, a + 2, a + 1 + nf)}
  a = a + 2 + nf
  for _ = 1, nkeys do
    k = k + 1
    local v = redis.call('HMGET', KEYS[k], unpack(fields))
    for j = 1, nf do n = n + 1; out[n] = v[j] end
  end
end
return out
