-- Consumer groups of one pool shard (spec: common/pool/states.py; the rules of groups.py).
-- A group's slots are gp:<group> (records it has still to train on) and gl:<group> (leased by it). A slot
-- that holds a record is LEASED while any group leases it, READY while any group still needs it, else REFILL.

local function gp(name) return P .. 'gp:' .. name end
local function gl(name) return P .. 'gl:' .. name end
local function group_names() return redis.call('HKEYS', GROUPS) end

local function group_get(name)
  local raw = redis.call('HGET', GROUPS, name)
  return raw and cjson.decode(raw) or nil
end
local function group_put(name, g) redis.call('HSET', GROUPS, name, cjson.encode(g)) end

-- the global state of slots holding a record, from the groups (groups.py _settle)
local function settle(members)
  local names = group_names()
  for _, m in ipairs(members) do
    local leased, pending = false, false
    for _, name in ipairs(names) do
      leased = leased or redis.call('SISMEMBER', gl(name), m) == 1
      pending = pending or redis.call('SISMEMBER', gp(name), m) == 1
    end
    if leased then
      redis.call('SREM', READY, m)
    elseif pending then
      redis.call('SADD', READY, m)
    else
      redis.call('SREM', READY, m); redis.call('SADD', REFILL, m); redis.call('HSET', USES, m, 0)
    end
  end
end

-- plain draws and group draws do not mix; a group draw names an attached group, which counts as alive
local function check_group(name, now)
  if not name then
    if redis.call('HLEN', GROUPS) > 0 then
      fail('this pool serves consumer groups ' .. table.concat(group_names(), ', ') .. ': draw with group=<name>')
    end
    return
  end
  local g = group_get(name)
  if not g then
    fail("consumer group '" .. name .. "' is not attached (attach_group first; a group idle for lease_timeout_s "
         .. 'with no live lease is detached)')
  end
  g.seen = now
  group_put(name, g)
end

local function group_lease(name, k, id, deadline)
  local members = redis.call('SRANDMEMBER', gp(name), k)
  if #members == 0 then return members end
  each('SREM', gp(name), members); each('SADD', gl(name), members)
  add_lease(id, members, deadline, name)
  local g = group_get(name)
  g.consumed = g.consumed + #members
  group_put(name, g)
  settle(members)
  return members
end

-- a group's lease ends: trained on (release), or pending again (expiry, or a refunded draw)
local function group_unlease(name, members, again, now)
  local g = group_get(name)
  if not g then return end
  each('SREM', gl(name), members)
  if again then each('SADD', gp(name), members) end
  if now then g.seen = now; group_put(name, g) end
  settle(members)
end

local function detach(name)
  if not group_get(name) then return 0 end
  for _, id in ipairs(redis.call('HKEYS', LGROUP)) do
    if redis.call('HGET', LGROUP, id) == name then drop_lease(id) end
  end
  local held = redis.call('SUNION', gp(name), gl(name))
  redis.call('DEL', gp(name), gl(name)); redis.call('HDEL', GROUPS, name)
  if redis.call('HLEN', GROUPS) > 0 then
    settle(held)
  else                      -- a plain pool again: the records still held wait for the next consumer
    each('SADD', READY, held)
    for _, m in ipairs(redis.call('SMEMBERS', READY)) do redis.call('HSET', USES, m, 1) end
  end
  return 1
end

local function attach(name, policy, max_lag, timeout, now)
  if redis.call('HLEN', LEASES) > redis.call('HLEN', LGROUP) then
    fail('a plain (group-less) consumer holds leases on this pool: consumer groups and plain draws do not mix')
  end
  local g = group_get(name)
  if g then
    g.policy, g.max_lag, g.seen = policy, max_lag, now
    group_put(name, g)
    return 0
  end
  local held = redis.call('SMEMBERS', READY)
  for _, m in ipairs(leased_slots()) do held[#held + 1] = m end
  each('SADD', gp(name), held)
  group_put(name, {policy = policy, max_lag = max_lag, timeout = timeout, seen = now, consumed = 0, skipped = 0})
  return 1
end

-- the records only this group still needs: every other group is done with them (its lag)
local function lag(name)
  local others = {}
  for _, o in ipairs(group_names()) do
    if o ~= name then others[#others + 1] = gp(o); others[#others + 1] = gl(o) end
  end
  if #others == 0 then return {} end
  return redis.call('SDIFF', gp(name), unpack(others))
end

-- dead groups (no live lease, silent for their timeout) are detached; 'skip' groups drop their oldest lag
local function maintain_groups(now)
  local live = {}
  for _, name in ipairs(redis.call('HVALS', LGROUP)) do live[name] = true end
  for _, name in ipairs(group_names()) do
    local g = group_get(name)
    if not live[name] and now - g.seen > g.timeout then detach(name) end
  end
  for _, name in ipairs(group_names()) do
    local g = group_get(name)
    local behind = g.policy == 'skip' and lag(name) or {}
    local over = #behind - (g.max_lag or 0)
    if over > 0 then
      local born, order, drop = each('HMGET', BORN, behind), {}, {}
      for i = 1, #behind do order[i] = i end
      table.sort(order, function(a, b)
        local ba, bb = tonumber(born[a] or 0), tonumber(born[b] or 0)
        if ba ~= bb then return ba < bb end
        return tonumber(behind[a]) < tonumber(behind[b])
      end)
      for i = 1, over do drop[i] = behind[order[i]] end
      each('SREM', gp(name), drop)
      g.skipped = g.skipped + over
      group_put(name, g)
      settle(drop)
    end
  end
end

local function group_stats(now)
  local out = {}
  for _, name in ipairs(group_names()) do
    local g = group_get(name)
    out[#out + 1] = {name, cjson.encode(g), redis.call('SCARD', gp(name)), redis.call('SCARD', gl(name)),
                     #lag(name), tostring(now - g.seen)}
  end
  return out
end
