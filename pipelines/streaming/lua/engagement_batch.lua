-- Apply a batch of EngagementEvents to the real-time features in ONE atomic script
-- (scripts.ENGAGEMENT_BATCH; scripts.EngagementBatchScript lays out KEYS / ARGV). Keys:
-- core/online_layout.py; bucket / decay / trending math: core/realtime.py.
--
-- The result equals applying the events one at a time in batch order with the per-event rules
-- below (the former engagement.lua, one call per event; tests/integration/test_stream_batch_script.py
-- compares the two byte for byte), but each key is read at most once and written at most once per
-- batch: the state of every key lives in Lua tables while the events are folded in, so a batch
-- costs a few redis.calls per post, author and user (and per event hour: its idempotency set)
-- instead of ~37 per event.
--
-- Two phases. 1: reads only. Every key is first read with a command of its type (HGET, HGETALL,
-- HMGET, ZCARD, SMISMEMBER, ...; TYPE for the two sets only written), which is also the key's type
-- check: a key of another type aborts the script with an error naming it while nothing is written (a
-- script is not rolled back), and the processor retries the batch one event per call, so only the
-- event whose key is bad stays pending. 2: writes, which cannot fail on a key's type any more.
--
-- Idempotency: an event whose id is in the idempotency set of its event hour
-- (online_layout.rt_seen_set), or whose id an earlier event of this batch had, is a redelivery: it
-- changes nothing and returns 0 (a redelivery carries its event's time, so its hour's set). Every
-- other event is applied and its id added to that set in the same script, so a crash leaves either
-- the whole batch applied and marked or none of it. A set expires seen_ttl s after its last write:
-- an id stays at least seen_ttl s after it was added. One SADD per hour replaces a SET per event.
--
-- Parts (ARGV ``parts``, letters of 'gpau'; one Redis: all four in one call). In a Redis Cluster a
-- script may touch one slot only, so scripts.EngagementBatchScript splits a batch by hash tag and
-- calls this script once per part: 'g' (global: trending, coverage, post tags; slot {rt}) with every
-- event, 'p' with one post's events, 'a' with one author's weighted events, 'u' with one user's
-- events that touch a user key. Each entity's state depends only on its own events in batch order,
-- and trending / coverage only on all events in order, so the parts together write what one call
-- writes; each part has its own idempotency sets (in its slot), so a part applied before a crash is
-- skipped on redelivery and the others applied: exact once per part.
--
-- KEYS: the 4 named below ('g' only), then one idempotency set per event hour, then per post its
-- counts hash, which also holds the newest-event fields and the decayed score ('p' only), per
-- author (score; 'a' only), per user (recent_posts, recent_authors, hated, follows, social_ts, action_sequence), then
-- (n_acks > 0) the events' stream.
-- ARGV: the 20 named below, then per post its id, per author its id, then per event: kind,
-- event_ts ('%.6f'), post index, author index, user index (1-based into the lists above; user
-- index 0: the event touches no user key), event id, idempotency set index, then (n_acks > 0) the
-- consumer group and one stream entry id per event, acknowledged (XACK) as the last write: the writes and the ack are one
-- atomic step. ``kinds`` is 'name weight positive engaged ...'.
-- Returns per event 1 (applied now) or 0 (applied before: nothing written).
--
-- Lua costs here are mostly conversions and global lookups (tonumber of a string ~200 ns, a
-- number concatenated ~600 ns): library functions are locals, the per-event indexes stay strings
-- (table keys), expiry times are formatted once.
local index_post_meta, trending_posts, trending_tags, coverage = unpack(KEYS, 1, 4)
local seen_ttl, write_ts, n_events, n_posts, n_authors, n_users, n_seen, n_acks, kinds, half_life,
      counts_ttl, score_ttl, recent_cap, retention_s, bucket_s, trending_half_life, trending_cap,
      out_of_order_s, sequence_cap, parts = unpack(ARGV, 1, 20)

local tonumber, type, pairs, ipairs, unpack, error = tonumber, type, pairs, ipairs, unpack, error
local floor, min, max, pow, log = math.floor, math.min, math.max, math.pow, math.log
local format, match, gmatch, find = string.format, string.match, string.gmatch, string.find
local rcall, rpcall = redis.call, redis.pcall
local KEYS, ARGV = KEYS, ARGV

local ne, np, na, nu, nk = tonumber(n_events), tonumber(n_posts), tonumber(n_authors), tonumber(n_users),
                          tonumber(n_acks)
local ns = tonumber(n_seen)
local write_s, half, retention, bucket_len = tonumber(write_ts), tonumber(half_life), tonumber(retention_s),
                                             tonumber(bucket_s)
local tr_half, tr_cap, ooo = tonumber(trending_half_life), tonumber(trending_cap), tonumber(out_of_order_s)
local rcap, scap = tonumber(recent_cap), tonumber(sequence_cap)
local G, P, A = find(parts, 'g', 1, true) ~= nil, find(parts, 'p', 1, true) ~= nil, find(parts, 'a', 1, true) ~= nil
local K_SEEN, A_POST = G and 4 or 0, 20
local K_POST = K_SEEN + ns
local K_AUTHOR = K_POST + (P and np or 0)
local K_USER = K_AUTHOR + (A and na or 0)
local A_AUTHOR = A_POST + np
local A_EVENT = A_AUTHOR + na
local EV = 7  -- ARGV values per event
local A_ACK = A_EVENT + EV * ne  -- then the group and the entry ids; their stream is the last key
if #KEYS ~= K_USER + 6 * nu + (nk > 0 and 1 or 0) or #ARGV ~= A_ACK + (nk > 0 and nk + 1 or 0)
   or (nk > 0 and nk ~= ne) then
  return redis.error_reply('ERR engagement_batch.lua: ' .. #KEYS .. ' keys / ' .. #ARGV ..
                           ' args do not match the counts in ARGV')
end
-- per kind: score weight, its log2 (trending), positive head (recent engagements), engaged head
-- (the user action sequence)
local WEIGHT, LOG2W, POSITIVE, ENGAGED = {}, {}, {}, {}
for name, w, pos, eng in gmatch(kinds, '(%S+) (%S+) (%d) (%d)') do
  WEIGHT[name] = tonumber(w); POSITIVE[name] = pos == '1'; ENGAGED[name] = eng == '1'
  if WEIGHT[name] > 0 then LOG2W[name] = log(WEIGHT[name]) / log(2) end
end
local CHUNK = 1000  -- unpack() puts its values on Lua's C stack (8000 slots): commands take <= CHUNK
-- expiry as absolute ms (SET PXAT, PEXPIREAT), the form Redis propagates to the AOF and replicas: a
-- relative EX / EXPIRE would be rewritten into it once per write
local now = rcall('TIME')
local now_ms = tonumber(now[1]) * 1000 + floor(tonumber(now[2]) / 1000)
local seen_at = format('%d', now_ms + 1000 * tonumber(seen_ttl))
local counts_at = format('%d', now_ms + 1000 * tonumber(counts_ttl))
local score_at = format('%d', now_ms + 1000 * tonumber(score_ttl))

-- a read that also checks the key's type: an error names the key and aborts (phase 1 only)
local function read(cmd, key, ...)
  local r = rpcall(cmd, key, ...)
  if type(r) == 'table' and r['err'] then error({err = r['err'] .. ' (' .. cmd .. ' ' .. key .. ')'}) end
  return r
end
local function guard_type(key, want)
  local got = rcall('TYPE', key)['ok']
  if got ~= 'none' and got ~= want then
    error({err = 'WRONGTYPE ' .. key .. ' is a ' .. got .. ', expected ' .. want})
  end
end
-- cmd key [pre] list... in chunks of CHUNK items of ``step`` values; replies concatenated
local function chunked(cmd, key, list, step, pre)
  if #list <= CHUNK * step then  -- the usual case: one call, no copy
    if pre then return rcall(cmd, key, pre, unpack(list)) end
    return rcall(cmd, key, unpack(list))
  end
  local out = {}
  for s = 1, #list, CHUNK * step do
    local args = {}
    if pre then args[1] = pre end
    for k = s, min(s + CHUNK * step - 1, #list) do args[#args + 1] = list[k] end
    local r = rcall(cmd, key, unpack(args))
    if type(r) == 'table' then for _, v in ipairs(r) do out[#out + 1] = v end end
  end
  return out
end

-- ---------------------------------------------------------------- phase 1: reads, folding in memory
-- each event's id and set; per set, its distinct ids and whether each is in it (SMISMEMBER, which
-- is also the set's type check)
local ids, set_of = {}, {}
local set_ids, set_pos = {}, {}  -- per set: its distinct ids; id -> position in that list
for s = 1, ns do set_ids[s] = {}; set_pos[s] = {} end
for i = 1, ne do
  local b = A_EVENT + EV * (i - 1)
  local id, sj = ARGV[b + 6], tonumber(ARGV[b + 7])
  ids[i], set_of[i] = id, sj
  local pos = set_pos[sj]
  if not pos[id] then local l = set_ids[sj]; l[#l + 1] = id; pos[id] = #l end
end
local marked = {}  -- per set: position -> 1 if the id is in the set
for s = 1, ns do
  local l, got = set_ids[s], {}
  for c = 1, #l, CHUNK do
    local part = {}
    for k = c, min(c + CHUNK - 1, #l) do part[#part + 1] = l[k] end
    local r = read('SMISMEMBER', KEYS[K_SEEN + s], unpack(part))
    for k = 1, #r do got[c + k - 1] = r[k] end
  end
  marked[s] = got
end
local marks = {}
for i = 1, ne do
  local sj = set_of[i]
  marks[i] = marked[sj][set_pos[sj][ids[i]]] == 1
end

-- tags of the posts with a weighted event (the candidate index's post metadata), one HMGET
local tags_of = {}  -- post index (string) -> list of tags
if G then
  local tagged, want = {}, {}  -- post indexes (strings), each once
  for i = 1, ne do
    local b = A_EVENT + EV * (i - 1)
    local pj = ARGV[b + 3]
    if LOG2W[ARGV[b + 1]] and not want[pj] then want[pj] = true; tagged[#tagged + 1] = pj end
  end
  for s = 1, #tagged, CHUNK do
    local part = {}
    for k = s, min(s + CHUNK - 1, #tagged) do part[#part + 1] = ARGV[A_POST + tonumber(tagged[k])] end
    local got = read('HMGET', index_post_meta, unpack(part))
    for k = 1, #part do
      local tags = got[k] and match(got[k], '|([%d,]*)$')
      if tags then
        local list = {}
        for tag in gmatch(tags, '%d+') do list[#list + 1] = tag end
        tags_of[tagged[s + k - 1]] = list
      end
    end
  end
end

-- a counts field's bucket start ('kind:start'; false if it has none), and the field of (kind,
-- bucket): the same strings for every post of the batch, so built once
local BUCKET_OF, FIELD = {}, {}
local function bucket_of(f)
  local b = BUCKET_OF[f]
  if b == nil then b = tonumber(match(f, ':(%-?%d+)$')) or false; BUCKET_OF[f] = b end
  return b
end
local function field_of(kind, bucket)
  local by_kind = FIELD[kind]
  if not by_kind then by_kind = {}; FIELD[kind] = by_kind end
  local f = by_kind[bucket]
  if not f then f = kind .. ':' .. format('%d', bucket); by_kind[bucket] = f; BUCKET_OF[f] = bucket end
  return f
end

-- entity state, created at an entity's first applied event (keyed by the index as passed)
local posts, authors, users = {}, {}, {}
local post_order, author_order, user_order = {}, {}, {}
local function post_state(pj)
  local p = {counts_key = KEYS[K_POST + tonumber(pj)], id = ARGV[A_POST + tonumber(pj)]}
  -- field -> count; dirty / deleted: what phase 2 writes. The hash's fields without a bucket are
  -- kept apart: p.newest (the newest event; with the last write, rewritten with every batch) and
  -- the decayed score (p.v at p.t, read here: decayed_add needs no read of its own)
  local flat = read('HGETALL', p.counts_key)
  local counts = {}
  for k = 1, #flat, 2 do counts[flat[k]] = tonumber(flat[k + 1]) end
  p.newest = counts['last_event_ts']
  p.v, p.t, p.loaded = counts['score_v'], counts['score_t'], true
  counts['last_event_ts'], counts['last_write_ts'], counts['score_v'], counts['score_t'] = nil, nil, nil, nil
  p.counts, p.dirty = counts, {}
  posts[pj] = p
  post_order[#post_order + 1] = p
  return p
end
local function author_state(aj)
  local j = tonumber(aj)
  local a = {score_key = KEYS[K_AUTHOR + j], id = ARGV[A_AUTHOR + j]}
  authors[aj] = a
  author_order[#author_order + 1] = a
  return a
end
local function user_state(uj)
  local b = K_USER + 6 * (tonumber(uj) - 1)
  -- zkey / zpairs / zcard: the capped zsets (recent posts, recent authors, action sequence), their
  -- (score, member) pairs in event order and their sizes before the batch
  local u = {zkey = {KEYS[b + 1], KEYS[b + 2], KEYS[b + 6]}, zpairs = {}, zcard = {}, hated = KEYS[b + 3],
             follows = KEYS[b + 4], social_ts = KEYS[b + 5]}
  users[uj] = u
  user_order[#user_order + 1] = u
  return u
end
local RECENT_POSTS, RECENT_AUTHORS, SEQUENCE = 1, 2, 3
local ZCAP = {rcap, rcap, scap}
local function zset_pairs(u, z)
  local zp = u.zpairs[z]
  if not zp then
    zp = {}
    u.zpairs[z] = zp
    u.zcard[z] = read('ZCARD', u.zkey[z])
  end
  return zp
end

-- decayed score (core.realtime.decayed_add): v at time t, out-of-order events in closed form
local function decayed_add(s, ets, w)
  if not s.loaded then
    local cur = read('HMGET', s.score_key, 'v', 't')
    if cur[1] then s.v = tonumber(cur[1]); s.t = tonumber(cur[2]) end
    s.loaded = true
  end
  local v, t = 0.0, ets
  if s.v then v = s.v; t = s.t end
  if ets >= t then
    v = v * pow(2, -(ets - t) / half) + w
    t = ets
  else
    v = v + w * pow(2, -(t - ets) / half)
  end
  s.v, s.t, s.score_dirty = v, t, true
end

local tr_posts, tr_tags = {}, {}  -- member, x, member, x, ... in event order
local cov, covn, cov_dirty = nil, {}, {}  -- since, newest, first: as stored ('%.6f'), as numbers
local result = {}
local in_batch = {}  -- per idempotency set: the ids applied by this call (an id counts once per hour, as across calls)
for s = 1, ns do in_batch[s] = {} end
local clock_edge = write_s + bucket_len  -- events beyond: a skewed producer's clock
for i = 1, ne do
  local b = A_EVENT + EV * (i - 1)
  local id, applied_here = ids[i], in_batch[set_of[i]]
  if marks[i] or applied_here[id] then
    result[i] = 0
  else
    applied_here[id] = true
    result[i] = 1
    local kind, event_ts, pj, aj, uj = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
    local ets = tonumber(event_ts)
    local bucket = floor(ets / bucket_len) * bucket_len  -- = core.realtime.bucket_start
    local p = P and (posts[pj] or post_state(pj))
    local a = A and (authors[aj] or author_state(aj))
    local post_id = p and p.id or ARGV[A_POST + tonumber(pj)]
    local author_id = a and a.id or ARGV[A_AUTHOR + tonumber(aj)]
    -- the post's newest event time (kept; an older event does not move it back)
    local newest = ets
    if p and p.newest and p.newest > ets then newest = p.newest end
    if p then p.newest = newest end
    -- a bucket wholly older than the 24 h window of the newest event is dropped, never written; the
    -- newest is taken at most a bucket ahead of the processor's clock, so one event from a skewed
    -- producer cannot push the post's real buckets out of the window
    local horizon = min(newest, clock_edge) - retention
    if p and bucket + bucket_len > horizon then
      local counts = p.counts
      local f = field_of(kind, bucket)
      local n = counts[f]
      if n == nil then
        -- a new field: prune expired buckets (at most once per kind and bucket, so O(fields) is
        -- cheap); the horizon never moves back within a batch, so a pruned field never returns
        counts[f] = 1
        for g, _ in pairs(counts) do
          local gb = bucket_of(g)
          if gb and gb + bucket_len <= horizon then
            counts[g] = nil
            if not p.deleted then p.deleted = {} end
            p.deleted[#p.deleted + 1] = g
          end
        end
      else
        counts[f] = n + 1
      end
      p.dirty[f] = true
    end
    -- coverage (StreamCoverage): ``newest`` event time, ``first`` (the first event applied) and
    -- ``since``, the earliest event time applied that can count in a window: within 24 h of newest
    -- and at most out_of_order_s (core.realtime.OUT_OF_ORDER_S) before first, so a lone straggler
    -- cannot claim that the stream holds everything back to its time. An event more than a bucket
    -- ahead of the processor's clock (a skewed producer) is applied but moves no coverage field.
    if G and ets <= clock_edge then
      if not cov then
        cov = read('HMGET', coverage, 'since', 'newest', 'first')
        for k = 1, 3 do covn[k] = cov[k] and tonumber(cov[k]) end
      end
      local gnewest = ets
      if cov[2] and covn[2] > ets then gnewest = covn[2] else cov[2], covn[2], cov_dirty[2] = event_ts, ets, true end
      local first = ets
      if cov[3] then first = covn[3] else cov[3], covn[3], cov_dirty[3] = event_ts, ets, true end
      if ets > gnewest - retention and ets >= first - ooo and ((not cov[1]) or covn[1] > ets) then
        cov[1], covn[1], cov_dirty[1] = event_ts, ets, true
      end
    end
    local l2w = LOG2W[kind]
    if l2w then  -- weight > 0
      local w = WEIGHT[kind]
      if p then decayed_add(p, ets, w) end
      if a then decayed_add(a, ets, w) end
      if G then
        -- forward decay in log2 space: score = log2(sum_i w_i 2^(t_i / half)), summed with log-sum-exp
        local x = l2w + ets / tr_half
        tr_posts[#tr_posts + 1] = post_id; tr_posts[#tr_posts + 1] = x
        local tags = tags_of[pj]
        if tags then
          for _, tag in ipairs(tags) do tr_tags[#tr_tags + 1] = tag; tr_tags[#tr_tags + 1] = x end
        end
      end
    end
    if uj ~= '0' then
      local u = users[uj] or user_state(uj)
      if POSITIVE[kind] then
        local rp, ra = zset_pairs(u, RECENT_POSTS), zset_pairs(u, RECENT_AUTHORS)
        rp[#rp + 1] = ets; rp[#rp + 1] = post_id
        ra[#ra + 1] = ets; ra[#ra + 1] = author_id
      end
      if ENGAGED[kind] then
        -- the user action sequence (core.online_layout.action_sequence, member encode_action): the
        -- index wrote the history before its cutoff, live engagements are appended here, the
        -- newest 2N members kept (one per post and action: N posts fit)
        local seq = zset_pairs(u, SEQUENCE)
        seq[#seq + 1] = ets; seq[#seq + 1] = post_id .. '|' .. author_id .. '|' .. kind
      end
      if kind == 'hate' then
        if not u.hated_add then guard_type(u.hated, 'set'); u.hated_add = {} end
        u.hated_add[#u.hated_add + 1] = author_id
      end
      if kind == 'follow' then
        -- an engagement "follow" is a follow action: same stale-event rule as social.lua
        if not u.follows_add then
          guard_type(u.follows, 'set')
          u.follows_add, u.social, u.social_dirty = {}, {}, {}
        end
        local f = 'follow:' .. author_id
        local last = u.social[f]
        if last == nil then last = read('HGET', u.social_ts, f); u.social[f] = last end
        if (not last) or tonumber(last) <= ets then
          u.social[f] = event_ts; u.social_dirty[f] = true
          u.follows_add[#u.follows_add + 1] = author_id
        end
      end
    end
  end
end
local tr_card = {}
if #tr_posts > 0 then tr_card[trending_posts] = read('ZCARD', trending_posts) end
if #tr_tags > 0 then tr_card[trending_tags] = read('ZCARD', trending_tags) end

-- ---------------------------------------------------------------- phase 2: writes
local applied = {}  -- per set: the ids applied now
for s = 1, ns do applied[s] = {} end
for i = 1, ne do
  if result[i] == 1 then local l = applied[set_of[i]]; l[#l + 1] = ids[i] end
end
for s = 1, ns do
  if #applied[s] > 0 then
    chunked('SADD', KEYS[K_SEEN + s], applied[s], 1)
    rcall('PEXPIREAT', KEYS[K_SEEN + s], seen_at)
  end
end
local function write_score(s)
  if s.score_dirty then
    rcall('HSET', s.score_key, 'v', format('%.17g', s.v), 't', format('%.17g', s.t))
    rcall('PEXPIREAT', s.score_key, score_at)
  end
end
for _, p in ipairs(post_order) do
  -- one hash per post: its changed buckets, its newest-event fields and its score in one HSET, one
  -- expiry (the score lives as long as the counts: 26 h after the last batch that touched the post,
  -- by when a 6 h half-life has decayed it to 5 % at most)
  local set, counts = {'last_event_ts', format('%.6f', p.newest), 'last_write_ts', write_ts}, p.counts
  if p.score_dirty then
    set[5], set[6], set[7], set[8] = 'score_v', format('%.17g', p.v), 'score_t', format('%.17g', p.t)
  end
  for f, _ in pairs(p.dirty) do
    if counts[f] then set[#set + 1] = f; set[#set + 1] = counts[f] end
  end
  chunked('HSET', p.counts_key, set, 2)
  if p.deleted then chunked('HDEL', p.counts_key, p.deleted, 1) end
  rcall('PEXPIREAT', p.counts_key, counts_at)
end
for _, a in ipairs(author_order) do write_score(a) end

-- a capped trending zset: each (member, x) of seq combined into the member's score by log-sum-exp,
-- the lowest members beyond the cap removed after each add, as one event per call would (a member
-- removed and seen again restarts from its new events). If no removal can happen (the members
-- new to the zset fit under the cap) the final scores go in one ZADD.
local function trending_apply(key, seq)
  if #seq == 0 then return end
  local members, known = {}, {}
  for k = 1, #seq, 2 do
    local m = seq[k]
    if not known[m] then known[m] = true; members[#members + 1] = m end
  end
  local cur = chunked('ZMSCORE', key, members, 1)
  local score, new = {}, 0
  for k, m in ipairs(members) do
    if cur[k] then score[m] = tonumber(cur[k]) else score[m] = false; new = new + 1 end
  end
  local function add(m, x)
    local c = score[m]
    if c then
      local hi, lo = max(c, x), min(c, x)
      x = hi + log(1 + pow(2, lo - hi)) / log(2)
    end
    return x
  end
  local card = tr_card[key]
  if card + new <= tr_cap then
    for k = 1, #seq, 2 do score[seq[k]] = add(seq[k], seq[k + 1]) end
    local args = {}
    for _, m in ipairs(members) do args[#args + 1] = format('%.17g', score[m]); args[#args + 1] = m end
    chunked('ZADD', key, args, 2)
  else
    for k = 1, #seq, 2 do
      local m = seq[k]
      local x = add(m, seq[k + 1])
      card = card + rcall('ZADD', key, format('%.17g', x), m)
      score[m] = x
      if card > tr_cap then
        -- = ZREMRANGEBYRANK key 0 -(cap + 1), and names what it removed
        local popped = rcall('ZPOPMIN', key, card - tr_cap)
        for q = 1, #popped, 2 do score[popped[q]] = false end
        card = tr_cap
      end
    end
  end
end
trending_apply(trending_posts, tr_posts)
trending_apply(trending_tags, tr_tags)

-- a capped zset of the user: ZADD GT of its (score, member) pairs, then the members beyond the cap
-- with the lowest scores removed. Trimming once at the end leaves what trimming after each add
-- leaves: a member trimmed during the batch was below ``cap`` members that only rise, so it is
-- below them at the end too (with its highest score), and a member kept has its highest score.
for _, u in ipairs(user_order) do
  for z = 1, 3 do
    local zp = u.zpairs[z]
    if zp then
      chunked('ZADD', u.zkey[z], zp, 2, 'GT')
      if u.zcard[z] + #zp / 2 > ZCAP[z] then rcall('ZREMRANGEBYRANK', u.zkey[z], 0, -(ZCAP[z] + 1)) end
    end
  end
  if u.hated_add then chunked('SADD', u.hated, u.hated_add, 1) end
  if u.follows_add then
    local fields = {}
    for f, _ in pairs(u.social_dirty) do fields[#fields + 1] = f; fields[#fields + 1] = u.social[f] end
    if #fields > 0 then chunked('HSET', u.social_ts, fields, 2) end
    if #u.follows_add > 0 then chunked('SADD', u.follows, u.follows_add, 1) end
  end
end
if cov then
  local fields, names = {}, {'since', 'newest', 'first'}
  for k = 1, 3 do
    if cov_dirty[k] then fields[#fields + 1] = names[k]; fields[#fields + 1] = cov[k] end
  end
  if #fields > 0 then rcall('HSET', coverage, unpack(fields)) end
end
if nk > 0 then
  -- the events' stream entries, acknowledged with the writes (applied now or before: both done)
  local ids = {}
  for k = 1, nk do ids[k] = ARGV[A_ACK + 1 + k] end
  chunked('XACK', KEYS[#KEYS], ids, 1, ARGV[A_ACK + 1])
end
return result
