-- HMGET of many hashes in one call, grouped by field list (read-only; FeastLayoutFeatureHydrator._read
-- in feast_layout.py builds KEYS / ARGV and decodes the reply). One request's Feast reads are ~800
-- hashes, mostly (user, author) pairs of which ~2 % exist: a missing hash costs one EXISTS (one
-- argument) instead of an HMGET of every field, and adds one byte to the reply instead of a nil per
-- field (measured: bench/hydration.py, README "Request budget").
--   KEYS: the hashes, group after group
--   ARGV: the number of groups, then per group: its number of keys, its number of fields, the fields
-- Returns {flags, values}: flags, one byte per key in KEYS order ('1': the hash exists, '0': it does
-- not); values, per existing key, per field the value (flat, row-major; a missing field is nil).
local flags, out, n, a, k = {}, {}, 0, 2, 0
local rcall, unpack = redis.call, unpack
for _ = 1, tonumber(ARGV[1]) do
  local nkeys, nf = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local fields = {unpack(ARGV, a + 2, a + 1 + nf)}
  a = a + 2 + nf
  for _ = 1, nkeys do
    k = k + 1
    if rcall('EXISTS', KEYS[k]) == 1 then
      flags[k] = '1'
      local v = rcall('HMGET', KEYS[k], unpack(fields))
      for j = 1, nf do n = n + 1; out[n] = v[j] end
    else
      flags[k] = '0'
    end
  end
end
return {table.concat(flags), out}
