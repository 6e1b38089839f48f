-- Window sums of the stream processor's bucket hashes, computed in Redis (read-only;
-- realtime_reader.WindowSumsScript builds KEYS / ARGV). It runs for O(fields of the keys), e.g.
-- ~1 ms for 1000 posts of the demo's replay.
--   KEYS: the posts' counts hashes (core.online_layout.rt_post_counts), any number
--   ARGV: n windows, then (first, last) bucket start per window, then the kinds
-- Returns per key, per kind, per window the count (flat, integers).
local nw = tonumber(ARGV[1])
local lo, hi = {}, {}
for w = 1, nw do lo[w] = tonumber(ARGV[2 * w]); hi[w] = tonumber(ARGV[2 * w + 1]) end
local kinds, nk = {}, 0
for i = 2 * nw + 2, #ARGV do nk = nk + 1; kinds[ARGV[i]] = nk end
local out = {}
for j = 1, #KEYS * nk * nw do out[j] = 0 end
for p = 1, #KEYS do
  local base = (p - 1) * nk * nw
  local f = redis.call('HGETALL', KEYS[p])
  for i = 1, #f, 2 do
    local kind, b = string.match(f[i], '^(.*):(%-?%d+)$')
    local k = kinds[kind]
    if k then
      b = tonumber(b)
      for w = 1, nw do
        if b >= lo[w] and b <= hi[w] then
          local idx = base + (k - 1) * nw + w
          out[idx] = out[idx] + tonumber(f[i + 1])
        end
      end
    end
  end
end
return out
