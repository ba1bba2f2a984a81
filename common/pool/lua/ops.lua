-- The entry points of one pool shard (spec: common/pool/states.py). ARGV[1] names the operation; every
-- operation but init first checks that the shard exists (error DKDMNOINIT: the server lost it, the
-- client re-creates it empty) and expires overdue leases (-> READY, or pending again for a group) and
-- claims (-> REFILL).

local now, op = now_s(), ARGV[1]

-- A shard exists when its meta hash has a layout: a client's counter written straight to meta (HINCRBY)
-- just after the server lost the shard makes a meta hash without one, which is no shard.
local function exists() return redis.call('HEXISTS', META, 'layout') == 1 end

local function init()                 -- ARGV: layout, lo, hi, record_bytes, force -> {created, layout}
  if exists() and ARGV[6] ~= '1' then return {0, redis.call('HGET', META, 'layout')} end
  local lo, hi = tonumber(ARGV[3]), tonumber(ARGV[4])
  local identity = redis.call('HGET', META, 'identity')
  clear(lo, hi)
  redis.call('DEL', META)
  redis.call('HSET', META, 'layout', ARGV[2], 'lo', lo, 'hi', hi, 'record_bytes', ARGV[5])
  if identity then redis.call('HSET', META, 'identity', identity) end
  local slots = {}
  for m = lo, hi - 1 do slots[#slots + 1] = m end
  each('SADD', REFILL, slots)
  return {1, ARGV[2]}
end
if op == 'init' then return init() end
if not exists() then error({err = 'DKDMNOINIT ' .. META}) end

local function expire()
  local n = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASED, '-inf', now)) do
    local members, group = drop_lease(id)
    if group then group_unlease(group, members, true) else each('SADD', READY, members) end
    n = n + #members
  end
  bump('expired_leases', n)
  n = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', CLAIMED, '-inf', now)) do
    local members = split(redis.call('HGET', CLAIMS, id))
    redis.call('HDEL', CLAIMS, id); redis.call('ZREM', CLAIMED, id)
    each('SADD', REFILL, members)
    for _, m in ipairs(members) do redis.call('DEL', staged(id, m)) end     -- a fill that came too late
    n = n + #members
  end
  bump('expired_claims', n); bump('filling', -n)
  if redis.call('HLEN', GROUPS) > 0 then maintain_groups(now) end
end
expire()

-- {READY, LEASED, REFILL, FILLING, inserted, records the group may draw}; LEASED by subtraction
local function counts(group)
  local ready, refill, filling = redis.call('SCARD', READY), redis.call('SCARD', REFILL), stat('filling')
  return {ready, slot_count() - ready - refill - filling, refill, filling, stat('inserted'),
          group and redis.call('SCARD', gp(group)) or ready}
end

local ops = {}

-- ARGV: k, lease id, lease_timeout_s, group ('' for none), min_ready, all_or_nothing, count_call
--   -> {"s1,s2,...", "a1,a2,..." (ages), deadline} or, nothing leased, {'', '', counts}
function ops.draw()
  local k, id, group = tonumber(ARGV[2]), ARGV[3], ARGV[5] ~= '' and ARGV[5] or nil
  check_group(group, now)
  local c = counts(group)
  if ARGV[7] == '1' and (c[5] < tonumber(ARGV[6]) or c[6] < k) then return {'', '', c} end
  local deadline, members = now + tonumber(ARGV[4]), nil
  if group then
    members = group_lease(group, k, id, deadline)
  else
    members = redis.call('SPOP', READY, k)
    if #members > 0 then add_lease(id, members, deadline) end
  end
  if #members == 0 then return {'', '', c} end
  return {table.concat(members, ','), count_draw(members, tonumber(ARGV[8])), tostring(deadline)}
end

-- ARGV: lease id, refund ('1': a draw that timed out hands its slots back unused) -> slots released
function ops.release()
  local members, group = drop_lease(ARGV[2])
  if #members == 0 then return 0 end
  if group then
    group_unlease(group, members, ARGV[3] == '1', now)
  elseif ARGV[3] == '1' then
    each('SADD', READY, members)
  else
    spend(members)
  end
  if ARGV[3] ~= '1' then bump('released', #members) end
  return #members
end

-- ARGV: lease id, slot... : records that failed to decode, still leased -> empty REFILL slots
function ops.corrupt()
  local bad, keep, n = {}, {}, 0
  for i = 3, #ARGV do bad[ARGV[i]] = true end
  local members = split(redis.call('HGET', LEASES, ARGV[2]))
  for _, m in ipairs(members) do
    if bad[m] then
      redis.call('DEL', rec(m)); redis.call('HDEL', T, m); redis.call('HDEL', USES, m)
      for _, name in ipairs(group_names()) do redis.call('SREM', gp(name), m); redis.call('SREM', gl(name), m) end
      redis.call('SREM', READY, m); redis.call('SADD', REFILL, m)
      n = n + 1
    else
      keep[#keep + 1] = m
    end
  end
  if n == 0 then return 0 end
  if #keep > 0 then redis.call('HSET', LEASES, ARGV[2], table.concat(keep, ',')) else drop_lease(ARGV[2]) end
  bump('corrupt', n)
  return n
end

-- ARGV: k, claim id, claim_timeout_s -> {"s1,s2,...", deadline} (the client reads their previous records)
function ops.claim()
  local members = redis.call('SPOP', REFILL, tonumber(ARGV[2]))
  if #members == 0 then return {'', '0'} end
  local deadline = now + tonumber(ARGV[4])
  local list, before = table.concat(members, ','), redis.call('HGET', CLAIMS, ARGV[3])
  -- a claim retried after its reply was lost keeps the slots of its first attempt (they expire with it)
  redis.call('HSET', CLAIMS, ARGV[3], before and (before .. ',' .. list) or list)
  redis.call('ZADD', CLAIMED, 'NX', deadline, ARGV[3])
  bump('filling', #members)
  return {table.concat(members, ','), tostring(deadline)}
end

-- ARGV: claim id, count_call, then the slots, their t and their uses, each "v1,v2,..." in claim order; the
-- records wait in staging keys (f:<claim>:<slot>) -> records accepted (0: unknown or expired claim, staging deleted)
function ops.fill()
  local id, slots, ts, uses_left = ARGV[2], split(ARGV[4]), split(ARGV[5]), split(ARGV[6])
  local members, n, keys = split(redis.call('HGET', CLAIMS, id)), #slots, {}
  local ok = #members == n
  for i = 1, n do
    ok = ok and members[i] == slots[i]
    keys[i] = staged(id, slots[i])
  end
  local found = 0           -- one EXISTS per 4000 keys: a call per slot costs more than the check itself
  for i = 1, n, 4000 do found = found + redis.call('EXISTS', unpack(keys, i, math.min(i + 3999, n))) end
  if not (ok and found == n) then
    for i = 1, n, 4000 do redis.call('DEL', unpack(keys, i, math.min(i + 3999, n))) end
    bump('fill_rejected', tonumber(ARGV[3]))
    return 0
  end
  redis.call('HDEL', CLAIMS, id); redis.call('ZREM', CLAIMED, id)
  local produced, t, uses, born = stat('produced'), {}, {}, {}
  for i = 1, n do
    local m = slots[i]
    redis.call('RENAME', keys[i], rec(m))
    t[2 * i - 1], t[2 * i] = m, ts[i]
    uses[2 * i - 1], uses[2 * i] = m, uses_left[i]
    born[2 * i - 1], born[2 * i] = m, produced
  end
  each('HSET', T, t); each('HSET', USES, uses); each('HSET', BORN, born)
  for _, name in ipairs(group_names()) do each('SADD', gp(name), members) end
  each('SADD', READY, members)
  bump('filling', -n); bump('produced', n); bump('inserted', n)
  bump('bytes_in', n * stat('record_bytes')); bump('fills', tonumber(ARGV[3]))
  return n
end

function ops.counts()
  local group = ARGV[2] ~= '' and ARGV[2] or nil
  if group then check_group(group, now) end
  return counts(group)
end

-- -> {{READY, LEASED, REFILL, FILLING} each counted from its own keys, meta (flat), t of READY slots, groups}
function ops.stats()
  local ready, filling = redis.call('SMEMBERS', READY), 0
  for _, v in ipairs(redis.call('HVALS', CLAIMS)) do filling = filling + #split(v) end
  return {{#ready, #leased_slots(), redis.call('SCARD', REFILL), filling}, redis.call('HGETALL', META),
          each('HMGET', T, ready), group_stats(now)}
end

-- the whole shard in one atomic call (snapshot) -> {READY slots, LEASED slots, slots holding a record,
--   their uses, born, records}; every other slot is written as REFILL
function ops.dump()
  local held, recs = redis.call('HKEYS', T), {}
  for i = 1, #held, 4000 do
    local keys = {}
    for j = i, math.min(i + 3999, #held) do keys[#keys + 1] = rec(held[j]) end
    for _, v in ipairs(redis.call('MGET', unpack(keys))) do recs[#recs + 1] = v end
  end
  return {redis.call('SMEMBERS', READY), leased_slots(), held, each('HMGET', USES, held), each('HMGET', BORN, held), recs}
end

-- restore, begin: ARGV layout, lo, hi, record_bytes, inserted beyond the READY records -> the shard emptied
function ops.restore_begin()
  local lo, hi = tonumber(ARGV[3]), tonumber(ARGV[4])
  clear(lo, hi)
  redis.call('HDEL', META, 'filling')            -- the counters go on, as the other backends' do
  redis.call('HSET', META, 'layout', ARGV[2], 'lo', lo, 'hi', hi, 'record_bytes', ARGV[5], 'inserted', ARGV[6])
  return 1
end

-- restore, a chunk: ARGV corrupt, then (slot, 'R' or 'F', t or '' for an empty slot, uses, born) per slot;
-- the records of the slots that hold one were SET just before -> READY slots added (every attached group
-- has them pending)
function ops.restore_add()
  local ready, refill = {}, {}
  for i = 3, #ARGV, 5 do
    local m = ARGV[i]
    if ARGV[i + 1] == 'R' then ready[#ready + 1] = m else refill[#refill + 1] = m end
    if ARGV[i + 2] ~= '' then
      redis.call('HSET', T, m, ARGV[i + 2]); redis.call('HSET', USES, m, ARGV[i + 3]); redis.call('HSET', BORN, m, ARGV[i + 4])
    end
  end
  each('SADD', READY, ready); each('SADD', REFILL, refill)
  for _, name in ipairs(group_names()) do each('SADD', gp(name), ready) end
  bump('inserted', #ready); bump('corrupt', tonumber(ARGV[2]))
  return #ready
end

-- ARGV: name, policy, max_lag ('' for none), idle timeout s -> 1 attached, 0 re-configured
function ops.attach() return attach(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), now) end
function ops.detach() return detach(ARGV[2]) end
function ops.groups() return group_stats(now) end

return ops[op]()
