-- Lua over Redis stream ids and consumer groups, concatenated before the bus's scripts
-- (skip_trimmed.lua, applied_until.lua):
--   id_parts(id) -> ms, seq; id_before(a, b) -> a < b;
--   group_info(stream, group) -> the group's XINFO GROUPS fields by name (nil: no stream or group;
--   a nil reply, e.g. ``entries-read`` on Redis 7 after XDEL, is ``false``).
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function id_before(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
local function group_info(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if groups['err'] then return nil end
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == group then return f end
  end
  return nil
end
