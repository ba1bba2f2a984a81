-- One pool shard in Redis: keys, helpers and the plain slot transitions.
-- The slot life cycle these scripts implement (READY -> LEASED -> REFILL -> FILLING -> READY, expiry,
-- samples per insert, consumer groups) is specified once, in common/pool/states.py (the
-- contract: base.py); the numpy shard (shard.py, groups.py) implements the same machine.
--
-- lib.lua, groups.lua and ops.lua are concatenated into one script (redis_backend.py). KEYS[1] is the
-- shard's meta key "{<pool>:<shard>}:meta"; every other key of the shard is named from it with the
-- same hash tag, so a call touches one Redis Cluster hash slot.
--
--   meta     hash  layout, lo, hi, record_bytes, identity (shard 0) and the counters
--   ready    set   READY slots          refill  set   REFILL slots
--   leases   hash  lease id -> "s1,s2,..." (its LEASED slots)      leased  zset  lease id by deadline
--   lgroup   hash  lease id -> consumer group (group leases only)
--   claims   hash  claim id -> "s1,s2,..." (FILLING, claim order)  claimed zset  claim id by deadline
--   t, uses, born  hash slot -> chain index t, uses left, produced counter at fill; a slot holds a
--                  record exactly when it has a t entry
--   r:<slot>       string: the slot's record (redis_records.RecordCodec)
--   f:<claim>:<slot>  string: a record staged by a fill, renamed onto r:<slot> once the claim is checked
--                  (deleted when the claim turns out lost or expires)
--   groups   hash  group name -> JSON {policy, max_lag, timeout, seen, consumed, skipped}
--   gp:<group>, gl:<group>  sets: the slots a group has still to train on / holds leased
-- Deadlines use the server's clock (TIME), the one clock every client of a shard agrees on.

local P = string.sub(KEYS[1], 1, -5)
local META, READY, REFILL = KEYS[1], P .. 'ready', P .. 'refill'
local LEASES, LEASED, LGROUP = P .. 'leases', P .. 'leased', P .. 'lgroup'
local CLAIMS, CLAIMED = P .. 'claims', P .. 'claimed'
local T, USES, BORN, GROUPS = P .. 't', P .. 'uses', P .. 'born', P .. 'groups'

local function rec(m) return P .. 'r:' .. m end
local function staged(id, m) return P .. 'f:' .. id .. ':' .. m end

local function fail(msg) error({err = 'DKDM ' .. msg}) end

local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function stat(field) return tonumber(redis.call('HGET', META, field) or '0') end
local function bump(field, n) if n ~= 0 then redis.call('HINCRBY', META, field, n) end end

-- cmd key m1 m2 ... over a list, in chunks (unpack is bounded by Lua's C stack) -> the replies joined
local function each(cmd, key, list)
  local out = {}
  for i = 1, #list, 4000 do
    local r = redis.call(cmd, key, unpack(list, i, math.min(i + 3999, #list)))
    if type(r) == 'table' then for _, v in ipairs(r) do out[#out + 1] = v end end
  end
  return out
end

local function split(s)
  local out = {}
  if s then for m in string.gmatch(s, '[^,]+') do out[#out + 1] = m end end
  return out
end

local function slot_count() return stat('hi') - stat('lo') end

local function add_lease(id, members, deadline, group)
  local list, before = table.concat(members, ','), redis.call('HGET', LEASES, id)
  redis.call('HSET', LEASES, id, before and (before .. ',' .. list) or list)
  redis.call('ZADD', LEASED, 'NX', deadline, id)       -- a top-up keeps the lease's first deadline
  if group then redis.call('HSET', LGROUP, id, group) end
end

-- -> the lease's slots and its group (false for a plain lease); the lease is gone afterwards
local function drop_lease(id)
  local members, group = split(redis.call('HGET', LEASES, id)), redis.call('HGET', LGROUP, id)
  redis.call('HDEL', LEASES, id); redis.call('ZREM', LEASED, id); redis.call('HDEL', LGROUP, id)
  return members, group
end

-- every LEASED slot once (group leases may share slots)
local function leased_slots()
  local seen, out = {}, {}
  for _, v in ipairs(redis.call('HVALS', LEASES)) do
    for _, m in ipairs(split(v)) do
      if not seen[m] then seen[m] = true; out[#out + 1] = m end
    end
  end
  return out
end

-- the draw's counters -> the records' ages "a1,a2,..." (records produced in this shard since each fill)
local function count_draw(members, count_call)
  local born, produced, ages, sum = each('HMGET', BORN, members), stat('produced'), {}, 0
  for i = 1, #members do
    ages[i] = produced - tonumber(born[i] or produced)
    sum = sum + ages[i]
  end
  bump('consumed', #members); bump('bytes_out', #members * stat('record_bytes'))
  bump('draws', count_call); bump('age_sum', sum)
  return table.concat(ages, ',')
end

-- a plain lease handed back: one use of each record spent, READY with uses left, else REFILL
local function spend(members)
  local uses, ready, refill, left = each('HMGET', USES, members), {}, {}, {}
  for i, m in ipairs(members) do
    local u = tonumber(uses[i] or '0') - 1
    if u > 0 then
      ready[#ready + 1] = m; left[#left + 1] = m; left[#left + 1] = u
    else
      refill[#refill + 1] = m
    end
  end
  each('HSET', USES, left); each('SADD', READY, ready); each('SADD', REFILL, refill)
end

-- empty the shard's slot keys (init, reset, restore); its groups stay attached with nothing pending
local function clear(lo, hi)
  local claims = redis.call('HGETALL', CLAIMS)
  for i = 1, #claims, 2 do
    for _, m in ipairs(split(claims[i + 1])) do redis.call('DEL', staged(claims[i], m)) end
  end
  redis.call('DEL', READY, REFILL, LEASES, LEASED, LGROUP, CLAIMS, CLAIMED, T, USES, BORN)
  local keys = {}
  for m = lo, hi - 1 do keys[#keys + 1] = rec(m) end
  for i = 1, #keys, 4000 do redis.call('DEL', unpack(keys, i, math.min(i + 3999, #keys))) end
  for _, name in ipairs(redis.call('HKEYS', GROUPS)) do redis.call('DEL', P .. 'gp:' .. name, P .. 'gl:' .. name) end
end
