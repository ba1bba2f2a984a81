"""The Redis backend of the pool: shards as key groups, state transitions as Lua scripts.

Layout (one key group per shard, hash tag ``{<name>:<shard>}``, so every key a
script touches lies in one Redis Cluster hash slot; shard i lives on server
i mod n when ``redis_url`` lists n servers):

    {tag}:meta     hash   layout string, pool_id, shard range (the marker key: a server
                          without it has lost the pool and the shard is re-initialised)
    {tag}:ready    set    READY global slot ids
    {tag}:refill   set    REFILL slot ids
    {tag}:leased   zset   lease ids scored by lease deadline (server clock, seconds)
    {tag}:leases   hash   lease id -> its LEASED slot ids in this shard, "s1,s2,..." (a LEASED slot is
                          in exactly one; a lease is one field and one zset member, not one per slot)
    {tag}:filling  zset   FILLING slot ids scored by claim deadline
                          (also holds one sentinel member scored +inf: see _ZSET_SENTINEL)
    {tag}:owner    hash   slot -> claim id (a FILLING slot has exactly one)
    {tag}:rec      hash   slot -> stored record (resp.SlotFormat: fixed header, raw tensors, word-sum
                          checksum); an empty slot holds a placeholder of as many zero bytes (written
                          at init and restore, so the server allocates the pool's memory up front, as
                          the ray backend's preallocated arrays, and a fill overwrites it) or nothing
    {tag}:t        hash   slot -> chain index t of the stored record; a slot holds a record exactly
                          when it has an entry here (claims read previous records by it; stats' t histogram)
    {tag}:uses     hash   slot -> uses left (samples_per_insert budget; stale for REFILL/FILLING slots)
    {tag}:born     hash   slot -> shard's produced counter at fill (record age)
    {tag}:stats    hash   produced, inserted, consumed, released, bytes_in, bytes_out,
                          expired_leases, expired_claims, corrupt, fill_rejected, draws, fills,
                          age_sum, wire_bytes_in (encoded), draw_blocked_s, fill_blocked_s
    {tag}:g:<id>   list: the members of one claim in this shard

Every script first checks the marker (error ``DKDMNOINIT`` when it is gone:
the client re-initialises the shard, all slots empty REFILL, and retries) and
then expires overdue leases (LEASED -> READY) and claims (FILLING -> REFILL).
Deadlines use the Redis server's clock (``TIME``), the one clock every client
of a shard agrees on; ``Draw.deadline``/``Claim.deadline`` are the client's
estimate in ``time.time()``.

Round trips (pipelined per server; plain redis:// and unix:// URLs go through our own RESP
client, resp.RespConnection, TLS and Redis Cluster through redis-py):

- draw, one shard: the draw script (it checks the warm-up and READY itself and leases all b or
  nothing), then one HMGET of the records. Several shards on one (non-cluster) server: one
  script over every shard's keys (_DRAW_ALL: READY counts, the exact hypergeometric split,
  seeded by the client, and the leases), then one HMGET per shard in one round. A cluster or
  several servers: a counts round (the split needs the READY counts), the draw scripts, one
  HMGET per shard.
- release: one script per shard, or one over every shard on one server, posted
  (RespConnection.post): sent without waiting, its reply read first by the next call on the same
  connection, so the caller goes on while the server runs it (about 1 ms: 0.5 ms of script and a
  round trip) and its own next call sees it done. Another client sees it once the server has read
  it (on one server, before anything that client sends afterwards). A reply that is an error or is
  lost with its connection makes the release run again (_run; release is idempotent).
- claim, one shard: the claim script; several shards on one server: one script over every shard
  (_CLAIM_ALL); a cluster or several servers: counts first. Then one HMGET of the previous
  records of the slots that hold one (the scripts say which): none for a claim of empty slots.
- fill: per shard plain HSETs of the records into {tag}:rec, _FILL_CHUNK records each, encoded
  and sent one after the other, and the state script, in one round (while the claim has a
  margin of time left; else the records go through the script's ARGV).
Records never pass through Lua on the hot path: Lua copies every payload into a Lua string and
back (4.7 MB: 15.6 ms returned from a script against 4.7 ms for an HMGET; ~12 ms as ARGV against
~6 ms for an HSET, measured on the 2-core development machine).

Semantics follow base.py and shard.py exactly (rate limiting, uses, corruption,
snapshots); blocking is client-side polling with a growing sleep (1 ms..50 ms).
Connection loss (refused, reset, timeout, server loading its data) is retried
with exponential backoff for ``redis_retry_timeout_s``, then raises one
PoolError naming the URL. A retried draw or claim whose first attempt ran on
the server leaves a lease or claim nobody holds; it expires like any other.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import threading
import time
import uuid

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import metrics
from common.config import PoolConfig
from common.pool.base import (
    STATE_NAMES,
    STORAGE_DTYPES,
    Claim,
    Draw,
    Pool,
    PoolError,
    PoolStats,
    PoolTimeout,
    check_samples_per_insert,
    min_ready_slots,
    new_key,
    record_uses,
    shard_ranges,
    split_draw,
    t_histogram,
    timeout_message,
)
from common.pool.identity import check_identity
from common.pool.codec import SlotArrays, from_numpy, to_numpy, write_snapshot
from common.pool.local import load_snapshot_for, snapshot_header, surplus_inserted
from common.pool.memory import tune_malloc
from common.pool.resp import RespConnection, SlotFormat, owned
from common.pool.shard import zero_batch
from common.records import EMPTY_T, RecordBatch

LAYOUT_VERSION = "dkdm-pool-redis/3"   # 3: leases as fields of {tag}:leases (2: slot records in resp.SlotFormat,
#   owner entries per leased slot; 1: msgpack envelopes)
CLUSTER_SCHEME = "redis+cluster://"
_KEY_SUFFIXES = ("meta", "ready", "refill", "leased", "filling", "owner", "rec", "t", "uses", "born", "stats", "leases")
_STAT_FIELDS = (
    "produced", "inserted", "consumed", "released", "bytes_in", "bytes_out", "expired_leases", "expired_claims",
    "corrupt", "fill_rejected", "draws", "fills", "age_sum", "wire_bytes_in",
)
_CONN_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError, OSError)
_READ_SIZE = 1 << 20  # bytes per socket read
_CHUNK = 2000   # members per variadic command inside scripts (Lua's C stack holds ~8000)
_SLOT_OVERHEAD = 256   # bytes per slot besides its record (hash and set entries), a lower bound for _check_memory
_FILL_CHUNK = 8   # records per HSET of a fast fill (encoded while the server stores the previous chunk; 8 beat
#   1, 2, 4, 16, 32, 64 and one HSET per shard, interleaved A/B on the 2-core machine: 9.5-15 ms against 13-19 ms)

# The filling zset holds one sentinel member, scored +inf (it never expires) and longer
# than zset-max-listpack-value, so Redis keeps it a skiplist: a zset of up to 128 members is a
# listpack, where ZADD/ZREM of a batch of 128 cost O(n^2) score parses (4.4 ms against 1.2 ms per
# batch measured here), and an emptied zset would be deleted and start as a listpack again.
_ZSET_SENTINEL = "~dkdm-keeps-this-zset-a-skiplist~" + "~" * 40
# Likewise the per-slot hashes (owner, rec, t, uses, born) hold one sentinel field whose value is longer
# than hash-max-listpack-value: a hash of up to hash-max-listpack-entries fields (512 in Debian's
# redis-server) is a listpack, where each field of an HMGET or HSET is a linear scan (an HMGET of 128
# of 512 fields from Lua: 543 us against 19 us for 128 of a 2048-field hashtable, measured here). Every
# reader of a whole hash leaves it out (hash_all, hash_keys).
_HASH_SENTINEL = "~dkdm-keeps-this-hash-a-hashtable~"

# KEYS (one-shard scripts): 1 meta 2 ready 3 refill 4 leased 5 filling 6 owner 7 rec 8 t 9 uses 10 born
#   11 stats 12 leases 13 group. The functions take one shard's keys as a table K (the all-shard scripts
#   below pass each shard's 13 keys in turn).
_LIB = r"""
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function chunked(cmd, key, list)
  if #list == 0 then return {} end
  if #list <= 2000 then        -- one call: its reply as it is (a table, or {} for a count)
    local reply = redis.call(cmd, key, unpack(list))
    return type(reply) == 'table' and reply or {}
  end
  local out = {}
  for i = 1, #list, 2000 do
    local part = redis.call(cmd, key, unpack(list, i, math.min(i + 1999, #list)))
    if type(part) == 'table' then for _, v in ipairs(part) do out[#out + 1] = v end end
  end
  return out
end
-- {m1, v, m2, v, ...} (HSET field value pairs), or {v, m1, v, m2, ...} with first=true (ZADD score member)
local function pairs_of(members, v, first)
  local out = {}
  for i, m in ipairs(members) do
    if first then out[2 * i - 1] = v; out[2 * i] = m else out[2 * i - 1] = m; out[2 * i] = v end
  end
  return out
end
-- the members whose owner is claim id (every transition out of FILLING deletes the owner)
local function owned_by(K, members, id)
  local owners, out = chunked('HMGET', K[6], members), {}
  for i, m in ipairs(members) do
    if owners[i] == id then out[#out + 1] = m end
  end
  return out
end
-- cmd(key, s, ...) for every slot s in lo..hi-1, per_call slots per call: SADD key s1 s2 ..., or with a
-- value v, HSET key s1 v s2 v ...
local function over_slots(cmd, key, lo, hi, per_call, v)
  local batch = {}
  for s = lo, hi - 1 do
    batch[#batch + 1] = s
    if v then batch[#batch + 1] = v end
    if #batch >= per_call * (v and 2 or 1) then redis.call(cmd, key, unpack(batch)); batch = {} end
  end
  if #batch > 0 then redis.call(cmd, key, unpack(batch)) end
end
-- HGETALL / HKEYS of a per-slot hash less its sentinel field (see _HASH_SENTINEL)
local function hash_all(key)
  local flat, out = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do
    if flat[i] ~= '{HSENTINEL}' then out[#out + 1] = flat[i]; out[#out + 1] = flat[i + 1] end
  end
  return out
end
local function hash_keys(key)
  local out = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do if f ~= '{HSENTINEL}' then out[#out + 1] = f end end
  return out
end
-- The shard of slots lo..hi-1 emptied (init, restore): no slot in any state yet; the sentinels that keep
-- the filling zset a skiplist and the per-slot hashes hashtables; every record field holding its
-- placeholder, record_bytes zero bytes (an empty slot, see the layout); the marker and the counters.
local function fresh_shard(K, layout, pool_id, lo, hi, record_bytes, inserted)
  for i = 1, 12 do redis.call('DEL', K[i]) end
  redis.call('ZADD', K[5], '+inf', '{SENTINEL}')
  for i = 6, 10 do redis.call('HSET', K[i], '{HSENTINEL}', string.rep('~', 80)) end    -- owner rec t uses born
  over_slots('HSET', K[7], lo, hi, 128, string.rep('\0', record_bytes))
  redis.call('HSET', K[1], 'layout', layout, 'pool_id', pool_id, 'lo', lo, 'hi', hi)
  redis.call('HSET', K[11], 'produced', 0, 'inserted', inserted)
end
-- FILLING count: the zset less its sentinel (see _ZSET_SENTINEL)
local function zcard(key)
  return redis.call('ZCARD', key) - (redis.call('ZSCORE', key, '{SENTINEL}') and 1 or 0)
end
-- "m1,m2,..." -> {m1, m2, ...}
local function split_list(s)
  local out = {}
  if s then for m in string.gmatch(s, '[^,]+') do out[#out + 1] = m end end
  return out
end
-- the slots lease id holds in this shard, {} when none (released, expired or never leased here)
local function lease_members(K, id)
  return split_list(redis.call('HGET', K[12], id))
end
-- {every LEASED slot}: the members of every lease (stats and dump; the hot path counts by subtraction)
local function all_leased(K)
  return split_list(table.concat(redis.call('HVALS', K[12]), ','))
end
local function expire(K, now)
  local L = redis.call('ZRANGEBYSCORE', K[4], '-inf', now)
  if #L > 0 then
    local n = 0
    for _, id in ipairs(L) do
      local mine = lease_members(K, id)
      chunked('SADD', K[2], mine); n = n + #mine
    end
    chunked('HDEL', K[12], L); chunked('ZREM', K[4], L)
    if n > 0 then redis.call('HINCRBY', K[11], 'expired_leases', n) end
  end
  local F = redis.call('ZRANGEBYSCORE', K[5], '-inf', now)
  for _, m in ipairs(F) do
    redis.call('ZREM', K[5], m); redis.call('HDEL', K[6], m); redis.call('SADD', K[3], m)
  end
  if #F > 0 then redis.call('HINCRBY', K[11], 'expired_claims', #F) end
end
-- {READY, LEASED, REFILL, FILLING, inserted}; LEASED as the shard's slots less the other three (the
-- stats and dump scripts count the leases' members themselves: that is where the invariant is checked)
local function counts(K)
  local n = tonumber(redis.call('HGET', K[1], 'hi')) - tonumber(redis.call('HGET', K[1], 'lo'))
  local ready, refill, filling = redis.call('SCARD', K[2]), redis.call('SCARD', K[3]), zcard(K[5])
  return {ready, n - ready - refill - filling, refill, filling,
          tonumber(redis.call('HGET', K[11], 'inserted') or '0')}
end
-- Lease k READY slots of one shard (all of them READY: the caller checked) -> members, ages (strings
-- "m1,m2,...", "a1,a2,..."); stats counted, draws by count_call. The lease is one field of the leases
-- hash (its members, appended to by a top-up under the same id) and one member of the leased zset,
-- scored by its first deadline (NX: a top-up's slots expire with the lease's earliest, as the client
-- reports it in Draw.deadline).
local function lease(K, k, lease_id, deadline, count_call, record_bytes)
  local members = redis.call('SPOP', K[2], k)
  if #members == 0 then return '', '' end
  local list = table.concat(members, ',')
  local before = redis.call('HGET', K[12], lease_id)
  redis.call('HSET', K[12], lease_id, before and (before .. ',' .. list) or list)
  redis.call('ZADD', K[4], 'NX', deadline, lease_id)
  local born = chunked('HMGET', K[10], members)
  local produced = tonumber(redis.call('HGET', K[11], 'produced') or '0')
  local ages, age_sum = {}, 0
  for i = 1, #members do
    ages[i] = produced - tonumber(born[i] or produced)
    age_sum = age_sum + ages[i]
  end
  redis.call('HINCRBY', K[11], 'consumed', #members)
  redis.call('HINCRBY', K[11], 'bytes_out', #members * record_bytes)
  redis.call('HINCRBY', K[11], 'draws', count_call)
  redis.call('HINCRBY', K[11], 'age_sum', age_sum)
  return list, table.concat(ages, ',')
end
-- Claim up to k REFILL slots of one shard -> members "m1,m2,...", and per member '1' if its slot holds
-- a record (the client reads only those: a claim of empty slots needs no HMGET) else '0'
local function claim(K, k, claim_id, timeout_s, deadline)
  local members = redis.call('SPOP', K[3], k)
  if #members == 0 then return '', '' end
  chunked('ZADD', K[5], pairs_of(members, deadline, true)); chunked('HSET', K[6], pairs_of(members, claim_id))
  redis.call('DEL', K[13])
  chunked('RPUSH', K[13], members)
  redis.call('PEXPIRE', K[13], math.floor((timeout_s + 3600) * 1000))
  local has, t = {}, chunked('HMGET', K[8], members)      -- one call, not an HEXISTS per slot
  for i = 1, #members do has[i] = t[i] and '1' or '0' end
  return table.concat(members, ','), table.concat(has)
end
-- Hand back the slots lease id holds in one shard -> how many: refund (a draw that timed out) puts them
-- back READY as they were; else each spends one use, READY with uses left, else REFILL. A slot that
-- goes to REFILL keeps its stale uses entry (nothing reads the uses of a REFILL or FILLING slot: a fill
-- writes them anew, the dump writes 0), so the default of one use per record writes no uses at all.
local function release(K, id, refund)
  local mine = lease_members(K, id)
  local n = #mine
  if n == 0 then return 0 end
  redis.call('HDEL', K[12], id); redis.call('ZREM', K[4], id)
  if refund then
    chunked('SADD', K[2], mine)
    return n
  end
  local uses, left, ready, refill = chunked('HMGET', K[9], mine), {}, {}, {}
  for i, m in ipairs(mine) do
    local u = tonumber(uses[i] or '0') - 1
    if u > 0 then ready[#ready + 1] = m; left[#left + 1] = m; left[#left + 1] = u else refill[#refill + 1] = m end
  end
  if #left > 0 then chunked('HSET', K[9], left) end
  if #ready > 0 then chunked('SADD', K[2], ready) end
  if #refill > 0 then chunked('SADD', K[3], refill) end
  redis.call('HINCRBY', K[11], 'released', n)
  return n
end
-- The exact multivariate hypergeometric split of k draws over the slots counted in avail[1..S]: each
-- draw picks one of the slots left uniformly (a shard with probability its share of them), as one
-- uniform draw of k slots over the union does (base.split_draw). Seeded by the client (ARGV).
local function split(avail, k, seed)
  math.randomseed(seed)
  local left, out, rest = 0, {}, {}
  for j, a in ipairs(avail) do left = left + a; out[j] = 0; rest[j] = a end
  for _ = 1, k do
    local r, j = math.random(left), 1
    while r > rest[j] do r = r - rest[j]; j = j + 1 end
    rest[j] = rest[j] - 1; out[j] = out[j] + 1; left = left - 1
  end
  return out
end
"""
# One shard: check the marker, expire overdue leases and claims.
_PRELUDE = _LIB + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('DKDMNOINIT ' .. KEYS[1]) end
local now = now_s()
expire(KEYS, now)
"""
# All shards of one (non-cluster) server: KEYS holds 13 keys per shard, shard by shard -> KS[j]. A shard
# without its marker fails the call (DKDMNOINIT: the client re-initialises the shards and retries).
_PRELUDE_ALL = _LIB + r"""
local KS = {}
for j = 1, #KEYS / 13 do
  local K = {}
  for i = 1, 13 do K[i] = KEYS[13 * (j - 1) + i] end
  if redis.call('EXISTS', K[1]) == 0 then return redis.error_reply('DKDMNOINIT ' .. K[1]) end
  KS[j] = K
end
local now = now_s()
for _, K in ipairs(KS) do expire(K, now) end
"""

# ARGV: k, lease_id, lease_timeout_s, count_call (1 on one shard per draw call), record_bytes,
#   min_ready, all_or_nothing -> {members "m1,m2,...", ages "a1,a2,...", deadline,
#   counts {READY, LEASED, REFILL, FILLING, inserted} when nothing was leased, else {}} (two strings, not
#   2b array items to parse)
# all_or_nothing=1 (a pool of one shard: no counts round before the draw): lease nothing unless the
# shard holds k READY slots and has seen min_ready inserts. The records are read after it with a plain
# HMGET (nothing else can change a LEASED slot's record): returning them from Lua cost 15.6 ms for
# 4.7 MB against 4.7 ms for the HMGET (Lua copies every payload into a Lua string and back).
_DRAW = _PRELUDE + r"""
local k = tonumber(ARGV[1])
if ARGV[7] == '1' then
  local inserted = tonumber(redis.call('HGET', KEYS[11], 'inserted') or '0')
  if inserted < tonumber(ARGV[6]) or redis.call('SCARD', KEYS[2]) < k then
    return {'', '', tostring(now), counts(KEYS)}
  end
end
local deadline = now + tonumber(ARGV[3])
local members, ages = lease(KEYS, k, ARGV[2], deadline, tonumber(ARGV[4]), tonumber(ARGV[5]))
if members == '' then return {'', '', tostring(now), counts(KEYS)} end
return {members, ages, tostring(deadline), {}}
"""

# The draw of a pool whose shards all live on one non-cluster server, in one call (no counts round):
# ARGV: need, lease_id, lease_timeout_s, count_call, record_bytes, min_ready, seed
#   -> {{members per shard}, {ages per shard}, deadline, {counts per shard when nothing was leased, else
#   empty tables: the client reads them only then}}
# All or nothing: nothing is leased unless min_ready records were inserted (summed over shards) and
# need slots are READY; then need is split over the shards by their READY counts (split) and each
# shard leases its part as the one-shard draw does.
_DRAW_ALL = _PRELUDE_ALL + r"""
local need, rows, ready, inserted, total = tonumber(ARGV[1]), {}, {}, 0, 0
local members, ages = {}, {}
for j, K in ipairs(KS) do
  ready[j] = redis.call('SCARD', K[2]); total = total + ready[j]
  inserted = inserted + tonumber(redis.call('HGET', K[11], 'inserted') or '0')
  members[j] = ''; ages[j] = ''; rows[j] = {}
end
if inserted < tonumber(ARGV[6]) or total < need then
  for j, K in ipairs(KS) do rows[j] = counts(K) end
  return {members, ages, tostring(now), rows}
end
local parts = split(ready, need, tonumber(ARGV[7]))
local deadline, first = now + tonumber(ARGV[3]), tonumber(ARGV[4])
for j, K in ipairs(KS) do
  if parts[j] > 0 then
    members[j], ages[j] = lease(K, parts[j], ARGV[2], deadline, first, tonumber(ARGV[5]))
    first = 0
  end
end
return {members, ages, tostring(deadline), rows}
"""

# ARGV: lease_id, refund (1: back to READY, no use spent) -> slots released (see release in _LIB)
_RELEASE = _PRELUDE + r"""
return release(KEYS, ARGV[1], ARGV[2] == '1')
"""

# The release of a pool whose shards all live on one non-cluster server, in one call. ARGV as _RELEASE
_RELEASE_ALL = _PRELUDE_ALL + r"""
local n = 0
for _, K in ipairs(KS) do n = n + release(K, ARGV[1], ARGV[2] == '1') end
return n
"""
# ARGV: lease_id, slot... : corrupt records still leased under lease_id -> empty REFILL slots
_CORRUPT = _PRELUDE + r"""
local bad, keep, n = {}, {}, 0
for i = 2, #ARGV do bad[ARGV[i]] = true end
for _, m in ipairs(lease_members(KEYS, ARGV[1])) do
  if bad[m] then
    redis.call('HDEL', KEYS[7], m); redis.call('HDEL', KEYS[8], m); redis.call('HDEL', KEYS[9], m)
    redis.call('SADD', KEYS[3], m)
    n = n + 1
  else
    keep[#keep + 1] = m
  end
end
if n > 0 then
  if #keep > 0 then
    redis.call('HSET', KEYS[12], ARGV[1], table.concat(keep, ','))
  else
    redis.call('HDEL', KEYS[12], ARGV[1]); redis.call('ZREM', KEYS[4], ARGV[1])
  end
  redis.call('HINCRBY', KEYS[11], 'corrupt', n)
end
return n
"""

# ARGV: k, claim_id, claim_timeout_s -> {members "m1,...", has "0110...", deadline}; the previous
#   records (of the members whose has is 1) are read after it with a plain HMGET, as for draws
_CLAIM = _PRELUDE + r"""
local deadline = now + tonumber(ARGV[3])
local members, has = claim(KEYS, tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), deadline)
return {members, has, tostring(deadline)}
"""

# The claim of a pool whose shards all live on one non-cluster server, in one call (no counts round):
# ARGV: n, claim_id, claim_timeout_s, seed -> {{members per shard}, {has per shard}, deadline,
#   {counts per shard (before the claim)}}: min(n, REFILL) slots split over the shards by their
# REFILL counts, so a claim is uniform over all REFILL slots.
_CLAIM_ALL = _PRELUDE_ALL + r"""
local rows, refill, total, members, has = {}, {}, 0, {}, {}
for j, K in ipairs(KS) do
  rows[j] = counts(K); refill[j] = rows[j][3]; total = total + refill[j]
  members[j] = ''; has[j] = ''
end
if total == 0 then return {members, has, tostring(now), rows} end
local parts = split(refill, math.min(tonumber(ARGV[1]), total), tonumber(ARGV[4]))
local deadline = now + tonumber(ARGV[3])
for j, K in ipairs(KS) do
  if parts[j] > 0 then members[j], has[j] = claim(K, parts[j], ARGV[2], tonumber(ARGV[3]), deadline) end
end
return {members, has, tostring(deadline), rows}
"""

# ARGV: claim_id, count_call, record_bytes, then (slot, record, t, uses) per record
#   -> records accepted (0: the claim is gone)
_FILL = _PRELUDE + r"""
local n, bytes = 0, 0
local owned = {}
for i = 4, #ARGV, 4 do
  local m = ARGV[i]
  if redis.call('HGET', KEYS[6], m) ~= ARGV[1] or not redis.call('ZSCORE', KEYS[5], m) then
    return 0
  end
end
local produced = tonumber(redis.call('HGET', KEYS[11], 'produced') or '0')
for i = 4, #ARGV, 4 do
  local m = ARGV[i]
  redis.call('ZREM', KEYS[5], m); redis.call('HDEL', KEYS[6], m)
  redis.call('HSET', KEYS[7], m, ARGV[i + 1]); redis.call('HSET', KEYS[8], m, ARGV[i + 2])
  redis.call('HSET', KEYS[9], m, ARGV[i + 3]); redis.call('HSET', KEYS[10], m, produced)
  redis.call('SADD', KEYS[2], m)
  n = n + 1
  bytes = bytes + #ARGV[i + 1]
end
redis.call('DEL', KEYS[13])
redis.call('HINCRBY', KEYS[11], 'produced', n)
redis.call('HINCRBY', KEYS[11], 'inserted', n)
redis.call('HINCRBY', KEYS[11], 'bytes_in', n * tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[11], 'wire_bytes_in', bytes)
redis.call('HINCRBY', KEYS[11], 'fills', tonumber(ARGV[2]))
return n
"""

# The fast fill: a plain HSET of the records into {tag}:rec runs just before it in the same pipelined
# round (passing 4.7 MB through Lua ARGV cost ~12 ms against ~6 ms for the HSET). The client takes
# this path only while its claim has at least a margin of time left (the claim's slots are FILLING and
# owned by it, so nobody else reads or writes their records meanwhile).
# ARGV: claim_id, count_call, record_bytes, stored record bytes, then (slot, t, uses) per record
#   -> records accepted (0: the claim is gone; then the records just written are removed from slots
#   that are REFILL or FILLING, so none lingers as a "previous record" of a slot the claim lost)
_FILL_WRITTEN = _PRELUDE + r"""
local members, ts, uses = {}, {}, {}
for i = 5, #ARGV, 3 do
  local m = ARGV[i]
  members[#members + 1] = m
  ts[#ts + 1] = m; ts[#ts + 1] = ARGV[i + 1]
  uses[#uses + 1] = m; uses[#uses + 1] = ARGV[i + 2]
end
if #owned_by(KEYS, members, ARGV[1]) ~= #members then
  local stray = {}
  for _, m in ipairs(members) do
    if redis.call('SISMEMBER', KEYS[3], m) == 1 or redis.call('ZSCORE', KEYS[5], m) then stray[#stray + 1] = m end
  end
  if #stray > 0 then chunked('HDEL', KEYS[7], stray); chunked('HDEL', KEYS[8], stray); chunked('HDEL', KEYS[9], stray) end
  return 0
end
local n = #members
local produced = tonumber(redis.call('HGET', KEYS[11], 'produced') or '0')
chunked('ZREM', KEYS[5], members); chunked('HDEL', KEYS[6], members)
chunked('HSET', KEYS[8], ts); chunked('HSET', KEYS[9], uses); chunked('HSET', KEYS[10], pairs_of(members, produced))
chunked('SADD', KEYS[2], members)
redis.call('DEL', KEYS[13])
redis.call('HINCRBY', KEYS[11], 'produced', n)
redis.call('HINCRBY', KEYS[11], 'inserted', n)
redis.call('HINCRBY', KEYS[11], 'bytes_in', n * tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[11], 'wire_bytes_in', n * tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[11], 'fills', tonumber(ARGV[2]))
return n
"""

# -> {READY, LEASED, REFILL, FILLING, inserted}
_COUNTS = _PRELUDE + r"""
return counts(KEYS)
"""

# -> {counts (4), stats hash (flat), t of READY slots}
_STATS = _PRELUDE + r"""
local ready = redis.call('SMEMBERS', KEYS[2])
local ts = {}
if #ready > 0 then ts = chunked('HMGET', KEYS[8], ready) end
return {{redis.call('SCARD', KEYS[2]), #all_leased(KEYS), redis.call('SCARD', KEYS[3]),
         zcard(KEYS[5])}, redis.call('HGETALL', KEYS[11]), ts}
"""

# The whole shard in one atomic call (a snapshot stops this shard only for its own copy).
# -> {READY, REFILL, LEASED, FILLING members, {slots that hold a record}, {their records}, uses (flat),
#   born (flat), stats (flat)}
_DUMP = _PRELUDE + r"""
local held = hash_keys(KEYS[8])
return {redis.call('SMEMBERS', KEYS[2]), redis.call('SMEMBERS', KEYS[3]), all_leased(KEYS),
        redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(+inf'), held, chunked('HMGET', KEYS[7], held),
        hash_all(KEYS[9]), hash_all(KEYS[10]), redis.call('HGETALL', KEYS[11])}
"""

# ARGV: layout, lo, hi, pool_id, force, record_bytes -> {created (0/1), layout now stored}
# Every slot's record field gets its placeholder (record_bytes zero bytes): the shard's memory is
# allocated here, once (a server short of maxmemory fails the init, not a fill hours later), and the
# warm-up's fills overwrite fields of their own size (a 128-record fill into new fields took 7.7 ms
# against 3.5 ms overwriting, measured on the 2-core development machine: fresh allocator pages).
_INIT = _LIB + r"""
if redis.call('EXISTS', KEYS[1]) == 1 and ARGV[5] ~= '1' then
  return {0, redis.call('HGET', KEYS[1], 'layout')}
end
local lo, hi = tonumber(ARGV[2]), tonumber(ARGV[3])
fresh_shard(KEYS, ARGV[1], ARGV[4], lo, hi, tonumber(ARGV[6]), 0)
over_slots('SADD', KEYS[3], lo, hi, 2000)
return {1, ARGV[1]}
"""

# Restore, begin: ARGV layout, pool_id, inserted_extra, lo, hi, record_bytes -> the shard is emptied (no slot
#   in any state yet; every record field holds its placeholder, as after _INIT)
_RESTORE_BEGIN = _LIB + r"""
fresh_shard(KEYS, ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[3]))
return 1
"""

# Restore, a chunk: ARGV corrupt, then (slot, state R|F, record or '', t, uses, born) per slot
_RESTORE_ADD = r"""
local ready = 0
for i = 2, #ARGV, 6 do
  local m = ARGV[i]
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', KEYS[7], m, ARGV[i + 2]); redis.call('HSET', KEYS[8], m, ARGV[i + 3])
    redis.call('HSET', KEYS[9], m, ARGV[i + 4]); redis.call('HSET', KEYS[10], m, ARGV[i + 5])
  end
  if ARGV[i + 1] == 'R' then redis.call('SADD', KEYS[2], m); ready = ready + 1 else redis.call('SADD', KEYS[3], m) end
end
redis.call('HINCRBY', KEYS[11], 'inserted', ready)
redis.call('HINCRBY', KEYS[11], 'corrupt', tonumber(ARGV[1]))
return ready
"""

_SCRIPTS = {
    "draw": _DRAW, "draw_all": _DRAW_ALL, "claim_all": _CLAIM_ALL, "release": _RELEASE, "release_all": _RELEASE_ALL, "corrupt": _CORRUPT, "claim": _CLAIM, "fill": _FILL, "fill_written": _FILL_WRITTEN,
    "counts": _COUNTS, "stats": _STATS, "dump": _DUMP, "init": _INIT,
    "restore_begin": _RESTORE_BEGIN, "restore_add": _RESTORE_ADD,
}
_SCRIPTS = {name: src.replace("{SENTINEL}", _ZSET_SENTINEL).replace("{HSENTINEL}", _HASH_SENTINEL)
            for name, src in _SCRIPTS.items()}
# Loaded on every new RESP connection (RespConnection preamble): a posted release never meets NOSCRIPT
# after a reconnect, whose reply would be read (and the release run again) only after later calls ran
_POSTED_LOAD = [["SCRIPT", "LOAD", _SCRIPTS[n]] for n in ("release", "release_all")]


def parse_urls(url: str) -> tuple[list[str], bool]:
    """``redis_url`` -> (server URLs, cluster?). Comma-separated URLs: shard i on server i mod n.

    ``redis+cluster://host:port`` connects to a Redis Cluster (one seed node).
    """
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise PoolError("pool.redis_url is empty")
    cluster = any(u.startswith(CLUSTER_SCHEME) for u in urls)
    if cluster and len(urls) != 1:
        raise PoolError(f"pool.redis_url: a Redis Cluster takes one seed URL, got {len(urls)}")
    for u in urls:
        if not u.startswith(("redis://", "rediss://", "unix://", CLUSTER_SCHEME)):
            raise PoolError(f"pool.redis_url entry {u!r} is not a redis://, rediss://, unix:// or {CLUSTER_SCHEME} URL")
    return urls, cluster


class RedisPool(Pool):
    """B+ in one or more Redis servers (or a Redis Cluster); any number of processes share it by name."""

    def __init__(
        self,
        cfg: PoolConfig,
        num_slots: int,
        record_shape: tuple[int, int, int],
        has_logvar: bool,
        has_label: bool,
        num_timesteps: int = 1000,
        seed: int = 0,
        t_buckets: int = 10,
    ):
        self.cfg = cfg
        self.num_slots = int(num_slots)
        self.record_shape = tuple(int(s) for s in record_shape)
        self.has_logvar, self.has_label = bool(has_logvar), bool(has_label)
        self.storage_dtype = cfg.storage_dtype
        self.num_timesteps, self.t_buckets = int(num_timesteps), int(t_buckets)
        self.k = check_samples_per_insert(cfg.samples_per_insert)
        self.min_ready = min_ready_slots(cfg.min_ready_fraction, self.num_slots)
        self.ranges = shard_ranges(self.num_slots, cfg.shards)
        self.shards = len(self.ranges)
        # Process-unique stream: several clients with the same seed must not draw the same splits.
        self._seed = seed
        self.rng = np.random.default_rng([seed, uuid.uuid4().int & 0xFFFFFFFF])
        self.urls, self.cluster = parse_urls(cfg.redis_url)
        self.layout = (
            f"{LAYOUT_VERSION} slots={self.num_slots} shards={self.shards} shape={'x'.join(map(str, self.record_shape))} "
            f"dtype={self.storage_dtype} logvar={int(self.has_logvar)} label={int(self.has_label)} T={self.num_timesteps}"
        )
        # Raw bytes of one record, counted as shard.py counts them (tensors, t, label; not the envelope).
        elem = int(np.prod(self.record_shape)) * STORAGE_DTYPES[self.storage_dtype].itemsize
        self.record_bytes = (2 + self.has_logvar) * elem + 8 + 8 * self.has_label
        self.fmt = SlotFormat(self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)
        self._clients = [self._connect(u) for u in self.urls]
        self._fast_local, self._fast_all = threading.local(), []
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in _SCRIPTS.items()}
        self._key_names: dict[int, list[str]] = {}      # shard -> its fixed key names (keys)
        self._redo: list = []       # posted release calls whose reply was an error or lost: run again (_run)
        self._claims: dict[str, list[tuple[int, list[int]]]] = {}   # claim id -> [(shard, slots in order)]
        self._claim_deadlines: dict[str, float] = {}    # claim id -> earliest time.time() its deadline can be
        self.local = {"draw_blocked_s": 0.0, "fill_blocked_s": 0.0, "draw_s": 0.0, "fill_s": 0.0,
                      "reinitialised_shards": 0, "retries": 0, "wire_bytes_out": 0}
        self._init_shards(force=False)
        tune_malloc()        # each draw's batch reuses freed pages instead of faulting them in (memory.tune_malloc)

    def __reduce__(self):
        # A pool travels to other processes (Ray actors, workers) as its arguments; the copy reconnects.
        args = dict(cfg=self.cfg, num_slots=self.num_slots, record_shape=self.record_shape, has_logvar=self.has_logvar,
                    has_label=self.has_label, num_timesteps=self.num_timesteps, seed=self._seed, t_buckets=self.t_buckets)
        return (_rebuild, (args,))

    @classmethod
    def from_options(cls, redis_url: str, num_slots: int, record_shape=(3, 8, 8), has_logvar: bool = False,
                     has_label: bool = False, num_timesteps: int = 1000, seed: int = 0, t_buckets: int = 10, **cfg_fields):
        """Convenience constructor for tests and benchmarks: PoolConfig fields as keywords."""
        cfg = PoolConfig(backend="redis", redis_url=redis_url, num_slots=num_slots, **cfg_fields)
        return cls(cfg=cfg, num_slots=num_slots, record_shape=record_shape, has_logvar=has_logvar,
                   has_label=has_label, num_timesteps=num_timesteps, seed=seed, t_buckets=t_buckets)

    # --- connections and key layout -------------------------------------------------

    @classmethod
    def attach(cls, cfg: PoolConfig) -> "RedisPool":
        """A client of the existing pool ``cfg.name`` with the layout stored in its marker (never creates one)."""
        urls, cluster = parse_urls(cfg.redis_url)
        probe = cls.__new__(cls)
        probe.cfg, probe.urls, probe.cluster = cfg, urls, cluster
        probe._clients = [probe._connect(u) for u in urls]
        probe._fast_local, probe._fast_all, probe._key_names = threading.local(), [], {}
        meta = probe.keys(0)[0]
        try:
            raw = probe._with_retry(0, lambda: probe._clients[0].hget(meta, "layout"))
        finally:
            probe.close()
        if raw is None:
            raise PoolError(f"no redis pool named {cfg.name!r} on {urls[0]} (no key {meta})")
        fields = dict(f.split("=", 1) for f in raw.decode().split()[1:])
        shape = tuple(int(v) for v in fields["shape"].split("x"))
        return cls(cfg.model_copy(update={"shards": int(fields["shards"]), "storage_dtype": fields["dtype"]}),
                   num_slots=int(fields["slots"]), record_shape=shape, has_logvar=fields["logvar"] == "1",
                   has_label=fields["label"] == "1", num_timesteps=int(fields["T"]))

    def _connect(self, url: str):
        # Our own retry loop (_with_retry) owns connection loss; redis-py's hidden retries are off.
        # socket_read_size: replies are MB-sized batches of records; 1 MiB reads (not 64 KiB) cut the
        # pure-Python parser's recv and buffer calls about 16-fold.
        opts = dict(socket_connect_timeout=2.0, socket_timeout=60.0, retry=Retry(NoBackoff(), 0), health_check_interval=0,
                    socket_read_size=_READ_SIZE)
        if url.startswith(CLUSTER_SCHEME):
            from redis.cluster import RedisCluster

            return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):], socket_connect_timeout=2.0, socket_timeout=60.0,
                                         socket_read_size=_READ_SIZE)
        return redis.Redis.from_url(url, **opts)

    def _fast(self, server: int) -> RespConnection | None:
        """Our own RESP connection to ``server`` for the scripts (the hot path), one per thread (its
        replies are views of its read buffer): plain redis:// and unix:// URLs; TLS (rediss://) and a
        Redis Cluster stay on redis-py (None)."""
        conns = getattr(self._fast_local, "conns", None)
        if conns is None:
            conns = [None if self.cluster or not u.startswith(("redis://", "unix://")) else RespConnection(u, preamble=_POSTED_LOAD)
                     for u in self.urls]
            self._fast_local.conns = conns
            self._fast_all.extend(c for c in conns if c is not None)
        return conns[server]

    def _client(self, server: int):
        """The redis-py client of ``server``, once the replies of releases posted to it are read: they have
        run, so this client's own calls on another connection see them."""
        self._drain(server)
        return self._clients[server]

    def _drain(self, server: int) -> None:
        """Read the replies of the releases this thread posted to ``server`` (they have run then)."""
        fast = self._fast(server)
        if fast is not None and fast.posted:
            self._with_retry(server, fast.drain)

    def _server(self, shard: int | None) -> int:
        return 0 if self.cluster or shard is None else shard % len(self._clients)

    @property
    def _one_server(self) -> bool:
        """All shards on one non-cluster server: draws and claims run as one script over every shard
        (_DRAW_ALL, _CLAIM_ALL; a call with shard None in _run)."""
        return self.shards > 1 and not self.cluster and len(self.urls) == 1

    def _call_keys(self, shard: int | None, group: str | None) -> list[str]:
        """The KEYS of a script call: one shard's 13, or with shard None every shard's, shard by shard."""
        if shard is not None:
            return self.keys(shard, group)
        return [k for s in range(self.shards) for k in self.keys(s, group)]

    def keys(self, shard: int, group: str | None = None) -> list[str]:
        fixed = self._key_names.get(shard)
        if fixed is None:           # built once per shard, not per script call
            fixed = self._key_names[shard] = [f"{{{self.cfg.name}:{shard}}}:{s}" for s in _KEY_SUFFIXES]
        return fixed + [f"{{{self.cfg.name}:{shard}}}:g:{group or '-'}"]

    def _with_retry(self, server: int, fn):
        """Run ``fn()``; on connection loss retry with exponential backoff, then PoolError naming the URL."""
        start = time.monotonic()
        delay = 0.02
        while True:
            try:
                return fn()
            except _CONN_ERRORS as err:
                waited = time.monotonic() - start
                if waited >= self.cfg.redis_retry_timeout_s:
                    raise PoolError(
                        f"redis server {self.urls[server]} unreachable for {waited:.1f}s "
                        f"(pool.redis_retry_timeout_s={self.cfg.redis_retry_timeout_s:g}): {type(err).__name__}: {err}"
                    ) from None
                self.local["retries"] += 1
                time.sleep(min(delay, max(0.0, self.cfg.redis_retry_timeout_s - waited)))
                delay = min(delay * 2, 1.0)

    def _run(self, calls: list[tuple[int | None, str, str | None, list]]) -> dict[int | None, object]:
        """Run (shard, script, group, argv) calls, pipelined per server -> {shard: reply}. Shard None: an
        all-shard script (_one_server) over every shard's keys.

        A shard whose marker is gone (server restarted without persistence) is
        re-initialised as empty REFILL slots and its call is run once more.
        """
        out: dict[int, object] = {}
        by_server: dict[int, list] = {}
        for c in calls:
            by_server.setdefault(self._server(c[0]), []).append(c)
        for server, group in by_server.items():
            replies = self._with_retry(server, lambda: self._execute(server, group))
            again = []
            for c, r in zip(group, replies):
                if isinstance(r, redis.ResponseError) and str(r).startswith("DKDMNOINIT"):
                    again.append(c)
                elif isinstance(r, Exception):
                    raise PoolError(f"redis server {self.urls[server]}: script {c[1]} failed on shard {c[0]}: {r}")
                else:
                    out[c[0]] = r
            if again:
                out = {s: owned(r) for s, r in out.items()}    # the next execute reuses the read buffer
                self._init_shards(force=False, only=sorted({s for c in again
                                                            for s in (range(self.shards) if c[0] is None else [c[0]])}))
                for c, r in zip(again, self._with_retry(server, lambda: self._execute(server, again))):
                    if isinstance(r, Exception):
                        raise PoolError(f"redis server {self.urls[server]}: script {c[1]} failed on shard {c[0]}: {r}")
                    out[c[0]] = r
        if self._redo:              # posted calls that failed (their replies were read above): run them again
            redo, self._redo = self._redo, []
            out = {s: owned(r) for s, r in out.items()}
            self._run(redo)
        return out

    def _execute(self, server: int, calls: list) -> list:
        """EVALSHA each call (pipelined unless on a cluster); scripts missing on the server are loaded
        (SCRIPT LOAD) and only the calls that failed with NOSCRIPT are run again."""
        client, fast = self._clients[server], self._fast(server)
        replies: list = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            if fast is not None:
                got = fast.execute([self._evalsha(calls[i]) for i in todo])
            elif self.cluster:
                got = []
                for i in todo:
                    shard, name, grp, argv = calls[i]
                    keys = self.keys(shard, grp)
                    try:
                        got.append(client.evalsha(self._shas[name], len(keys), *keys, *argv))
                    except redis.ResponseError as err:
                        got.append(err)
            else:
                pipe = client.pipeline(transaction=False)
                for i in todo:
                    shard, name, grp, argv = calls[i]
                    keys = self._call_keys(shard, grp)
                    pipe.evalsha(self._shas[name], len(keys), *keys, *argv)
                got = pipe.execute(raise_on_error=False)
            missing = []
            for i, r in zip(todo, got):
                replies[i] = r
                if isinstance(r, redis.exceptions.NoScriptError):
                    missing.append(i)
            if not missing or attempt == 1:
                break
            replies = [owned(r) for r in replies]          # the retry reuses the read buffer
            for name in {calls[i][1] for i in missing}:
                client.script_load(_SCRIPTS[name])   # a cluster sends SCRIPT LOAD to every primary
            todo = missing
        return replies

    def _evalsha(self, call: tuple) -> list:
        """A (shard, script, group, argv) call -> its EVALSHA command for our own RESP connection."""
        shard, name, grp, argv = call
        keys = self._call_keys(shard, grp)
        return ["EVALSHA", self._shas[name], len(keys), *keys, *argv]

    def _check_memory(self, server: int, shards: list[int]) -> None:
        """Refuse to create shards that the server's maxmemory cannot hold: their slots' placeholders are
        written at init, by one script, and Redis checks maxmemory only when a script starts (a 2000-slot
        pool of 36 KiB records went to 80 MB on a server of 8 MB maxmemory). Shards that exist are not
        counted; a Redis Cluster is not checked."""
        client = self._clients[server]
        info = self._with_retry(server, lambda: client.info("memory"))
        limit = int(info.get("maxmemory", 0) or 0)
        if limit <= 0:
            return
        new = [s for s in shards if not self._with_retry(server, lambda s=s: client.exists(self.keys(s)[0]))]
        slots = sum(self.ranges[s][1] - self.ranges[s][0] for s in new)
        need, used = slots * (self.fmt.record_bytes + _SLOT_OVERHEAD), int(info["used_memory"])
        if new and used + need > limit:
            raise PoolError(
                f"redis server {self.urls[server]}: pool {self.cfg.name!r} needs about {need / 2**20:.0f} MiB for {slots} "
                f"slots of {self.fmt.record_bytes} bytes, but maxmemory is {limit / 2**20:.0f} MiB with "
                f"{used / 2**20:.0f} MiB used (raise maxmemory, or use fewer slots or storage_dtype fp16/bf16)"
            )

    def _init_shards(self, force: bool, only: list[int] | None = None) -> None:
        shards = range(self.shards) if only is None else only
        if not force and not self.cluster:
            for server in sorted({self._server(s) for s in shards}):
                self._check_memory(server, [s for s in shards if self._server(s) == server])
        calls = [(s, "init", None, [self.layout, self.ranges[s][0], self.ranges[s][1], uuid.uuid4().hex, int(force),
                                    self.fmt.record_bytes])
                 for s in shards]
        by_server: dict[int, list] = {}
        for c in calls:
            by_server.setdefault(self._server(c[0]), []).append(c)
        for server, group in by_server.items():
            replies = self._with_retry(server, lambda: self._execute(server, group))
            for (shard, *_), r in zip(group, replies):
                if isinstance(r, Exception):
                    raise PoolError(f"redis server {self.urls[server]}: cannot initialise shard {shard}: {r}")
                created, layout = int(r[0]), r[1].decode() if isinstance(r[1], bytes) else str(r[1])
                if layout != self.layout:
                    raise PoolError(
                        f"pool {self.cfg.name!r} on {self.urls[server]} has layout '{layout}', this process expects "
                        f"'{self.layout}' (another pool uses that name: pick another pool.name or restore over it)"
                    )
                if created and only is not None:
                    self.local["reinitialised_shards"] += 1

    # --- records ------------------------------------------------------------------------

    def _arrays(self, n: int, fill_empty: bool) -> dict[str, np.ndarray | None]:
        """n records of this layout as wire-dtype arrays: x_t, eps, logvar [n, C, H, W], t, y [n].
        ``fill_empty``: zeros and t = EMPTY_T (empty slots); else uninitialised (every row is written)."""
        alloc, wire = (np.zeros if fill_empty else np.empty), self.fmt.wire
        out = {name: alloc((n, *self.record_shape), dtype=wire) for name in self.fmt.fields}
        out.setdefault("logvar", None)
        out["t"] = np.full(n, EMPTY_T, dtype=np.int64)
        out["y"] = alloc(n, dtype=np.int64) if self.has_label else None
        return out

    def _records(self, members: dict[int, list]) -> dict[int, list]:
        """{shard: slot ids} -> {shard: stored records (bytes-like or None)}, one pipelined HMGET per
        shard and server (views of the read buffer on our own connections: decode before the next call)."""
        out: dict[int, list] = {}
        by_server: dict[int, list[int]] = {}
        for s in members:
            by_server.setdefault(self._server(s), []).append(s)
        for server, shards in by_server.items():
            client, fast = self._clients[server], self._fast(server)

            def fetch():
                if fast is not None:
                    return fast.execute([["HMGET", self.keys(s)[6], *members[s]] for s in shards])
                if self.cluster:
                    return [client.hmget(self.keys(s)[6], members[s]) for s in shards]
                pipe = client.pipeline(transaction=False)
                for s in shards:
                    pipe.hmget(self.keys(s)[6], members[s])
                return pipe.execute()

            out.update(self._hmget_replies(server, shards, self._with_retry(server, fetch)))
        return out

    def _hmget_replies(self, server: int, shards: list[int], replies: list) -> dict[int, list]:
        """The HMGET replies of ``shards`` in order -> {shard: records}; PoolError for an error reply."""
        for s, r in zip(shards, replies):
            if isinstance(r, Exception):
                raise PoolError(f"redis server {self.urls[server]}: HMGET of shard {s}'s records failed: {r}")
        return dict(zip(shards, replies))

    def _fetch_into(self, members: dict[int, list], dest: dict, to: np.ndarray) -> list[str | None]:
        """{shard: slot ids} -> their records decoded into ``dest`` at rows ``to`` (the shards' slots one
        after the other, shards in ascending order) -> why per record in that order (None: written; else
        why it is corrupt, as SlotFormat.decode_into answers)."""
        order = sorted(members)
        why = self._read_direct(order, members, dest, to)
        return why if why is not None else self._decode(order, self._records(members), dest, to)

    def _decode(self, order: list[int], records: dict[int, list], dest: dict, to: np.ndarray) -> list[str | None]:
        payloads = [p for s in order for p in records[s]]
        self.local["wire_bytes_out"] += sum(len(p) for p in payloads if p is not None)
        return self.fmt.decode_into(payloads, dest, to, [records[s] for s in order])   # all shards in one pass

    def _read_direct(self, order: list[int], members: dict[int, list], dest: dict, to: np.ndarray) -> list[str | None] | None:
        """Shards on one server reached by our own connection: one pipelined round of HMGETs whose replies
        are read from the socket straight into the batch (RespConnection.execute_into: about 0.5 ms less per
        draw+release of 128 records of 36 KiB than reading them into the read buffer and copying them out,
        A/B in one process) -> why per record, as _fetch_into (a reply that is not a row of intact records
        is decoded from the replies). None when this path does not apply (several servers, a cluster, TLS,
        fields padded on the wire)."""
        servers = {self._server(s) for s in order}
        server = servers.pop()
        fast = None if servers else self._fast(server)
        if fast is None or not self.fmt.placeable:
            return None
        placed: list = []

        def targets():        # laid out once the HMGETs are sent, while the server runs them
            placed[:] = self.fmt.placement(dest, to)
            return placed[0]

        cmds = [["HMGET", self.keys(s)[6], *members[s]] for s in order]
        counts = [len(members[s]) for s in order]
        replies = self._with_retry(server, lambda: fast.execute_into(cmds, counts, self.fmt.record_bytes, targets))
        if replies is not None:
            return self._decode(order, self._hmget_replies(server, order, replies), dest, to)
        self.local["wire_bytes_out"] += len(to) * self.fmt.record_bytes
        return self.fmt.check_placed(dest, to, placed[1], placed[2])

    def _batch(self, a: dict) -> RecordBatch:
        st = self.storage_dtype
        return RecordBatch(
            x_t=from_numpy(a["x_t"], st), t=torch.from_numpy(a["t"]), eps=from_numpy(a["eps"], st),
            logvar=None if a["logvar"] is None else from_numpy(a["logvar"], st),
            y=None if a["y"] is None else torch.from_numpy(a["y"]),
        )

    def _encode(self, batch: RecordBatch) -> np.ndarray:
        """A batch -> its slot records [n, L] uint8 (one cast of each field, vectorised headers and checksums)."""
        return self._encoder(batch)(0, len(batch))

    def _encoder(self, batch: RecordBatch):
        """A batch -> ``encode(i0, i1)``: the slot records [i1 - i0, L] uint8 of its records i0..i1-1
        (each field cast once here; headers and checksums vectorised per call)."""
        fields = {name: to_numpy(getattr(batch, name), self.storage_dtype) for name in self.fmt.fields}
        t = batch.t.detach().cpu().to(torch.int64).numpy()
        y = None if batch.y is None else batch.y.detach().cpu().to(torch.int64).numpy()

        def encode(i0: int, i1: int) -> np.ndarray:
            return self.fmt.encode({k: v[i0:i1] for k, v in fields.items()}, t[i0:i1], None if y is None else y[i0:i1])

        return encode

    # --- counts -------------------------------------------------------------------------

    def _counts(self) -> np.ndarray:
        """[S, 5]: READY, LEASED, REFILL, FILLING, inserted per shard (after expiry)."""
        res = self._run([(s, "counts", None, []) for s in range(self.shards)])
        return np.array([[int(v) for v in res[s]] for s in range(self.shards)], dtype=np.int64)

    @staticmethod
    def _state_counts(rows: np.ndarray) -> dict[str, int]:
        return {n: int(rows[:, i].sum()) for i, n in enumerate(STATE_NAMES)}

    def _wait(self, delay: float) -> float:
        time.sleep(delay)
        return min(delay * 1.5, 0.05)

    def _add_blocked(self, side: str, seconds: float) -> None:
        if seconds <= 0:
            return
        self.local[f"{side}_blocked_s"] += seconds
        metrics.inc(metrics.POOL_BLOCKED_SECONDS_TOTAL, seconds, side=side)
        client = self._client(self._server(0))
        self._with_retry(self._server(0), lambda: client.hincrbyfloat(self.keys(0)[10], f"{side}_blocked_s", seconds))

    # --- the contract -------------------------------------------------------------------

    def _lease(self, lease_id: str, need: int, first: bool) -> tuple[dict[int, list], np.ndarray | None]:
        """One attempt to lease ``need`` READY slots -> ({shard: draw reply with slots}, counts [S, 5]; the
        counts may be None when something was leased).

        One shard: a single all-or-nothing draw script that checks the warm-up and READY itself (one
        round trip; the records are read after it). Several shards on one server: one all-or-nothing
        script over every shard (_DRAW_ALL: counts, the split, the leases). Else (a cluster, several
        servers): a counts round, then the exact multivariate hypergeometric split of ``need`` over the
        READY counts (``split_draw``, what makes draws uniform over slots) and one pipelined round of
        draw scripts. Nothing is leased (an empty dict) while the pool is cold or short of READY slots.
        """
        lease = [lease_id, self.cfg.lease_timeout_s]
        if self.shards == 1:
            r = self._run([(0, "draw", lease_id, [need, lease_id, self.cfg.lease_timeout_s, int(first), self.record_bytes,
                                                  self.min_ready, 1])])[0]
            r = _split_draw_reply(r)
            return ({0: r}, None) if r[0] else ({}, np.array([r[3]], dtype=np.int64))
        if self._one_server:
            members, ages, deadline, rows = self._run([(None, "draw_all", lease_id, [
                need, lease_id, self.cfg.lease_timeout_s, int(first), self.record_bytes, self.min_ready,
                int(self.rng.integers(1 << 31))])])[None]
            got = {s: _split_draw_reply([members[s], ages[s], deadline, rows[s]])
                   for s in range(self.shards) if len(members[s])}
            return (got, None) if got else ({}, np.array(rows, dtype=np.int64))
        rows = self._counts()
        if int(rows[:, 4].sum()) < self.min_ready or int(rows[:, 0].sum()) < need:
            return {}, rows
        split = split_draw(rows[:, 0], need, self.rng)
        res = self._run([(s, "draw", lease_id, [int(split[s]), lease[0], lease[1], int(first and j == 0), self.record_bytes, 0, 0])
                         for j, s in enumerate(np.flatnonzero(split).tolist())])
        res = {s: _split_draw_reply(r) for s, r in res.items()}
        return {s: r for s, r in res.items() if r[0]}, rows

    def draw(self, b: int, timeout_s: float | None = None, group: str | None = None) -> Draw:
        """Lease b READY slots uniformly at random over all shards (multivariate hypergeometric split)."""
        if group is not None:
            raise PoolError("consumer groups are not supported by the redis backend yet (use pool.backend=ray or local)")
        if not 1 <= b <= self.num_slots:
            raise PoolError(f"cannot draw {b} records from a pool of {self.num_slots} slots")
        timeout_s = self.cfg.block_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        lease_id = new_key()
        # Rows in random order: record k (in arrival order) goes to row free[k], so the batch comes out
        # shuffled without a copy and its order carries no shard structure. A corrupt record takes no
        # row: the top-up's records fill the rows left.
        free = self.rng.permutation(b)
        dest = self._arrays(b, fill_empty=False)     # the loop below only ends once all b rows are written
        slot_of_row = np.empty(b, dtype=np.int64)
        ages: list[int] = []
        filled = 0
        deadline = math.inf
        blocked, delay, wait_from = 0.0, 0.001, None   # blocked: from the first refusal until allowed
        while filled < b:
            c0 = time.monotonic()
            need = b - filled
            got, rows = self._lease(lease_id, need, first=filled == 0)
            if not got:
                if int(rows[:, 4].sum()) >= self.min_ready and int(rows[:, 0].sum()) >= need and self.shards > 1:
                    continue              # another client took them between the counts and the draw: recount
                wait_from = c0 if wait_from is None else wait_from
                if time.monotonic() - t0 >= timeout_s:
                    self._release(lease_id, refund=True)
                    self._add_blocked("draw", blocked + time.monotonic() - wait_from)
                    what = f"{need} READY slots (warm-up needs {self.min_ready} inserted)"
                    raise PoolTimeout(timeout_message(what, timeout_s, self._state_counts(rows),
                                                      f", inserted={int(rows[:, 4].sum())}, min_ready={self.min_ready}"))
                delay = self._wait(delay)
                continue
            if wait_from is not None:
                blocked, wait_from = blocked + time.monotonic() - wait_from, None
            order = sorted(got)
            members = [int(m) for s in order for m in got[s][0]]
            deadline = min(deadline, time.time() + self.cfg.lease_timeout_s)
            start = filled
            to = free[start:start + len(members)].copy()
            why = self._fetch_into({s: got[s][0] for s in order}, dest, to)
            ok = np.array([w is None for w in why], dtype=bool)
            good = int(ok.sum())
            slot_of_row[to[ok]] = np.asarray(members, dtype=np.int64)[ok]
            ages += itertools.islice((int(a) for a, g in zip((a for s in order for a in got[s][1]), ok) if g), 4 - len(ages))
            filled += good
            if good == len(why):
                continue
            free[start:start + len(members)] = np.concatenate([to[ok], to[~ok]])  # rows of bad ones: for the top-up
            j = 0
            for s in order:
                k = len(got[s][0])
                bad = [members[i] for i in range(j, j + k) if not ok[i]]
                j += k
                if bad:
                    self._run([(s, "corrupt", lease_id, [lease_id, *bad])])
                    metrics.inc(metrics.POOL_CORRUPT_TOTAL, len(bad), shard=s)
        self._add_blocked("draw", blocked)
        batch = self._batch(dest)
        elapsed = time.monotonic() - t0
        self.local["draw_s"] += elapsed
        metrics.observe(metrics.POOL_DRAW_SECONDS, elapsed)
        for a in ages:          # the slots are random: a sample of 4 suffices (as shard.py)
            metrics.observe(metrics.POOL_RECORD_AGE_STEPS, a)
        return Draw(lease_id=lease_id, slots=torch.from_numpy(slot_of_row), batch=batch, deadline=deadline)

    def release(self, lease_id: str) -> None:
        """Spend one use of each record still leased under ``lease_id``; a no-op otherwise (idempotent)."""
        self._release(lease_id, refund=False)

    def _release(self, lease_id: str, refund: bool) -> None:
        """The release script on every shard: one call over all shards when they share one plain server.
        A plain release is posted (_post): the caller goes on while the server runs it."""
        if self._one_server:
            calls = [(None, "release_all", lease_id, [lease_id, int(refund)])]
        else:
            calls = [(s, "release", lease_id, [lease_id, int(refund)]) for s in range(self.shards)]
        if refund:
            self._run(calls)
        else:
            self._post(calls)

    def _post(self, calls: list) -> None:
        """Send script calls without waiting for their replies (RespConnection.post: read before the next
        call's on the same connection, in order, or at close). A call whose reply is an error (NOSCRIPT
        after a SCRIPT FLUSH: a new connection loads the release scripts first, _POSTED_LOAD; a lost
        pool) or whose connection is lost before its reply is read is run again through _run (release
        is idempotent), as is any call that cannot be posted (a cluster, TLS, a send that fails)."""
        now = []
        for call in calls:
            fast = self._fast(self._server(call[0]))
            if fast is None:
                now.append(call)
                continue
            try:
                fast.post(self._evalsha(call), functools.partial(self._posted, call))
            except _CONN_ERRORS:
                now.append(call)
        if now:
            self._run(now)

    def _posted(self, call: tuple, reply) -> None:
        """A posted call's reply, read by a later call on its connection: an error (or a lost reply) -> run
        it again at the end of the next _run."""
        if isinstance(reply, Exception):
            self._redo.append(call)

    def claim_refill(self, n: int, timeout_s: float | None = None) -> Claim:
        """Claim up to n REFILL slots, spread uniformly over the shards' REFILL slots; previous records returned."""
        if n < 1:
            raise PoolError(f"claim_refill needs n >= 1, got {n}")
        timeout_s = self.cfg.block_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        claim_id = new_key()
        delay = 0.001
        while True:
            c_sent = time.monotonic()
            if self.shards == 1:          # SPOP takes min(n, REFILL) itself: no counts round
                res = self._run([(0, "claim", claim_id, [n, claim_id, self.cfg.claim_timeout_s])])
            elif self._one_server:        # one script over every shard: no counts round either
                members, has, deadline, _ = self._run([(None, "claim_all", claim_id, [
                    n, claim_id, self.cfg.claim_timeout_s, int(self.rng.integers(1 << 31))])])[None]
                res = {s: (members[s], has[s], deadline) for s in range(self.shards)}
            else:
                rows = self._counts()
                refill = rows[:, 2]
                res = {}
                if refill.sum() > 0:
                    split = split_draw(refill, min(n, int(refill.sum())), self.rng)
                    res = self._run([(s, "claim", claim_id, [int(split[s]), claim_id, self.cfg.claim_timeout_s])
                                     for s in np.flatnonzero(split).tolist()])
            parts = [(s, [int(m) for m in bytes(r[0]).split(b",")]) for s, r in sorted(res.items()) if len(r[0])]
            if parts:
                break
            if time.monotonic() - t0 >= timeout_s:
                self._add_blocked("fill", time.monotonic() - t0)
                raise PoolTimeout(timeout_message("a REFILL slot", timeout_s, self._state_counts(self._counts())))
            delay = self._wait(delay)
        if delay > 0.001:        # it waited at least once: the whole call was blocked time
            self._add_blocked("fill", time.monotonic() - t0)
        self._claims[claim_id] = parts
        self._claim_deadlines[claim_id] = time.time() + self.cfg.claim_timeout_s - (time.monotonic() - c_sent)
        # Previous records (empty slots: zeros, t = EMPTY_T; damaged ones are left empty too, the
        # teacher rebuilds the slot from scratch). Only slots that hold a record are read (the script's
        # has flags): a claim of empty slots makes no HMGET.
        total, i = sum(len(m) for _, m in parts), 0
        want, rows_of = {}, {}
        for s, members in parts:
            held = [j for j, f in enumerate(bytes(res[s][1])) if f == ord("1")]
            if held:
                want[s], rows_of[s] = [members[j] for j in held], np.asarray(held, dtype=np.int64) + i
            i += len(members)
        if want:
            dest = self._arrays(total, fill_empty=True)
            self._fetch_into(want, dest, np.concatenate([rows_of[s] for s in sorted(want)]))
            batch = self._batch(dest)
        else:           # the warm-up: one zero row broadcast, no memory to zero
            batch = zero_batch(total, self.record_shape, self.storage_dtype, self.has_logvar, self.has_label)
        slots = torch.tensor([m for _, members in parts for m in members], dtype=torch.int64)
        return Claim(claim_id=claim_id, slots=slots, batch=batch, deadline=time.time() + self.cfg.claim_timeout_s)

    def _claim_parts(self, claim_id: str) -> list[tuple[int, list[int]]]:
        parts = self._claims.get(claim_id)
        if parts is not None:
            return parts
        # A claim made by another client object: read its members (in order) from the shards.
        parts = []
        for s in range(self.shards):
            key = self.keys(s, claim_id)[-1]
            srv = self._server(s)
            members = self._with_retry(srv, lambda: self._client(srv).lrange(key, 0, -1))
            if members:
                parts.append((s, [int(m) for m in members]))
        return parts

    def fill(self, claim_id: str, batch: RecordBatch) -> bool:
        """FILLING -> READY with ``batch`` in the claim's slot order; False when the claim is unknown or expired."""
        t0 = time.monotonic()
        parts = self._claim_parts(claim_id)
        n = sum(len(m) for _, m in parts)
        if n == 0:
            self._claims.pop(claim_id, None)
            self._count_rejected()
            return False
        self._check_batch(batch, n)
        uses = record_uses(self.k, n, self.rng).tolist()
        t = batch.t.cpu().tolist()
        deadline = self._claim_deadlines.pop(claim_id, 0.0)
        margin = max(1.0, 0.1 * self.cfg.claim_timeout_s)
        if not self.cluster and all(self._fast(self._server(s)) is not None for s, _ in parts) and time.time() < deadline - margin:
            res = self._fill_written(claim_id, parts, self._encoder(batch), t, uses)
        else:
            records, calls, i = self._encode(batch), [], 0
            for s, members in parts:
                argv: list = [claim_id, int(not calls), self.record_bytes]
                for m in members:
                    argv += [m, memoryview(records[i]), int(t[i]), int(uses[i])]
                    i += 1
                calls.append((s, "fill", claim_id, argv))
            res = self._run(calls)
        self._claims.pop(claim_id, None)
        accepted = sum(int(v) for v in res.values())
        elapsed = time.monotonic() - t0
        self.local["fill_s"] += elapsed
        metrics.observe(metrics.POOL_FILL_SECONDS, elapsed)
        if accepted < n:
            self._count_rejected()
        if accepted:
            for s, members in parts:
                metrics.inc(metrics.POOL_RECORDS_PRODUCED_TOTAL, len(members), shard=s)
        return accepted == n

    def _fill_written(self, claim_id: str, parts: list, encode, t: list, uses: list) -> dict[int, int]:
        """The fast fill (see _FILL_WRITTEN): per shard plain HSETs of its records, then the state script,
        pipelined per server -> {shard: records accepted}. ``encode(i0, i1)``: the slot records of the
        claim's records i0..i1-1. The records are encoded and sent _FILL_CHUNK at a time, so the server
        stores one chunk while the next is encoded (on the 2-core machine encoding a 4.7 MB batch took
        about as long as the server's HSET of it)."""
        calls, hsets, i = [], {}, 0
        for s, members in parts:
            argv: list = [claim_id, int(not calls), self.record_bytes, self.fmt.record_bytes]
            for m in members:
                argv += [m, int(t[i]), int(uses[i])]
                i += 1
            hsets[s] = (i - len(members), members)
            calls.append((s, "fill_written", claim_id, argv))
        out: dict[int, int] = {}
        by_server: dict[int, list] = {}
        for c in calls:
            by_server.setdefault(self._server(c[0]), []).append(c)
        for server, group in by_server.items():
            def commands(group=group):
                for call in group:
                    s = call[0]
                    i0, members = hsets[s]
                    for c0 in range(0, len(members), _FILL_CHUNK):
                        rows = encode(i0 + c0, i0 + min(c0 + _FILL_CHUNK, len(members)))
                        fields: list = []
                        for m, row in zip(members[c0:c0 + _FILL_CHUNK], rows):
                            fields += [m, memoryview(row)]
                        yield ["HSET", self.keys(s)[6], *fields]
                    yield self._evalsha(call)

            replies = self._with_retry(server, lambda: self._fast(server).execute(commands()))
            scripts, j = [], -1
            for s, *_ in group:
                j += -(-len(hsets[s][1]) // _FILL_CHUNK) + 1
                scripts.append(replies[j])
            again = []
            for c, r in zip(group, scripts):
                if isinstance(r, Exception):       # NOSCRIPT or a lost shard: _run loads or re-initialises
                    again.append(c)
                else:
                    out[c[0]] = int(r)
            out.update(self._run(again) if again else {})
        return out

    def _count_rejected(self) -> None:
        client = self._client(self._server(0))
        self._with_retry(self._server(0), lambda: client.hincrby(self.keys(0)[10], "fill_rejected", 1))

    def _check_batch(self, batch: RecordBatch, n: int) -> None:
        if len(batch) != n:
            raise ValueError(f"fill got {len(batch)} records for a claim of {n} slots")
        for name in ("x_t", "eps") + (("logvar",) if self.has_logvar else ()):
            v = getattr(batch, name)
            if v is None or tuple(v.shape) != (n, *self.record_shape):
                got = None if v is None else tuple(v.shape)
                raise ValueError(f"fill: {name} has shape {got}, the pool stores {(n, *self.record_shape)}")
        if not self.has_logvar and batch.logvar is not None:
            raise ValueError("fill: records carry logvar but the pool was built without has_logvar")
        if self.has_label != (batch.y is not None):
            raise ValueError(f"fill: records {'lack' if self.has_label else 'carry'} labels y but the pool has has_label={self.has_label}")
        if n and (int(batch.t.min()) < 0 or int(batch.t.max()) >= self.num_timesteps):
            raise ValueError(f"fill: t must lie in [0, {self.num_timesteps}), got [{int(batch.t.min())}, {int(batch.t.max())}]")

    def stats(self) -> PoolStats:
        res = self._run([(s, "stats", None, []) for s in range(self.shards)])
        shard_counts, totals, ts = [], dict.fromkeys(_STAT_FIELDS, 0), []
        blocked = {"draw_blocked_s": 0.0, "fill_blocked_s": 0.0}
        for s in range(self.shards):
            counts, flat, tvals = res[s]
            shard_counts.append(dict(zip(STATE_NAMES, (int(c) for c in counts))))
            h = {k.decode(): v for k, v in zip(flat[::2], flat[1::2])}
            for k in _STAT_FIELDS:
                totals[k] += int(h.get(k, 0))
            for k in blocked:
                blocked[k] += float(h.get(k, 0.0))
            ts.extend(int(v) for v in tvals if v is not None)
        counts = {n: sum(c[n] for c in shard_counts) for n in STATE_NAMES}
        hist = t_histogram(np.array(ts, dtype=np.int64), self.num_timesteps, self.t_buckets)
        for s, c in enumerate(shard_counts):
            for name, v in c.items():
                metrics.set(metrics.POOL_SLOTS, v, shard=s, state=name)
        return PoolStats(
            num_slots=self.num_slots, counts=counts, shard_counts=shard_counts,
            produced_total=totals["produced"], consumed_total=totals["consumed"],
            bytes_in_total=totals["bytes_in"], bytes_out_total=totals["bytes_out"],
            draw_blocked_seconds_total=blocked["draw_blocked_s"], fill_blocked_seconds_total=blocked["fill_blocked_s"],
            t_histogram=hist, warm=totals["inserted"] >= self.min_ready, released_total=totals["released"],
            expired_leases_total=totals["expired_leases"], expired_claims_total=totals["expired_claims"],
            corrupt_total=totals["corrupt"], fill_rejected_total=totals["fill_rejected"],
            draw_seconds_total=self.local["draw_s"], fill_seconds_total=self.local["fill_s"],
            draws_total=totals["draws"], fills_total=totals["fills"],
            record_age_mean=totals["age_sum"] / max(totals["consumed"], 1),
            extra={"backend": "redis", "urls": list(self.urls), "inserted_total": totals["inserted"],
                   "wire_bytes_in_total": totals["wire_bytes_in"],
                   **self.local},
        )

    # --- identity (issue 8): a JSON field of shard 0's marker hash, set once with HSETNX ----

    def bind_identity(self, identity: dict) -> dict:
        meta, srv = self.keys(0)[0], self._server(0)
        client = self._clients[srv]
        blob = json.dumps(identity, sort_keys=True)
        held = self._with_retry(srv, lambda: (client.hsetnx(meta, "identity", blob), client.hget(meta, "identity"))[1])
        held = json.loads(held) if held is not None else identity
        check_identity(self.cfg.name, held, identity)
        return held

    def identity(self) -> dict | None:
        meta, srv = self.keys(0)[0], self._server(0)
        held = self._with_retry(srv, lambda: self._client(srv).hget(meta, "identity"))
        return None if held is None else json.loads(held)

    def attach_group(self, group: str, policy: str = "wait", max_lag: int | None = None) -> None:
        raise PoolError("consumer groups are not supported by the redis backend yet (use pool.backend=ray or local)")

    # --- snapshot and restore ----------------------------------------------------------

    def _dump_shard(self, s: int) -> SlotArrays:
        """One shard as SlotArrays (one atomic Lua call on the server, then decoded here)."""
        ready, refill, leased, filling, held, recs, uses_flat, born_flat, _ = self._run([(s, "dump", None, [])])[s]
        lo, hi = self.ranges[s]
        n = hi - lo
        state = np.full(n, 2, dtype=np.uint8)
        for m in list(ready) + list(leased):
            state[int(m) - lo] = 0
        for m in list(refill) + list(filling):
            state[int(m) - lo] = 2
        a = self._arrays(n, fill_empty=True)
        uses = np.zeros(n, dtype=np.int32)
        born = np.zeros(n, dtype=np.int64)
        for k, v in zip(uses_flat[::2], uses_flat[1::2]):
            uses[int(k) - lo] = int(v)
        for k, v in zip(born_flat[::2], born_flat[1::2]):
            born[int(k) - lo] = int(v)
        uses[state == 2] = 0        # left stale by releases (see _RELEASE); 0 as the other backends keep it
        where = np.array([int(k) - lo for k in held], dtype=np.int64)
        why = self.fmt.decode_into(list(recs), a, where)
        for i in where[[j for j, w in enumerate(why) if w is not None]].tolist():
            state[i] = 2 if state[i] == 0 else state[i]   # a damaged record is written as an empty REFILL slot
            uses[i] = 0
        # READY without a decodable record cannot be served: write it as empty REFILL.
        state[(state == 0) & (a["t"] == EMPTY_T)] = 2
        return SlotArrays(lo=lo, state=state, t=a["t"], uses=uses, produced_at=born, x_t=a["x_t"], eps=a["eps"],
                          logvar=a["logvar"], y=a["y"])

    def snapshot(self, path: str) -> None:
        """Write the pool to ``path`` in the codec's snapshot format (the same file the local and ray
        backends write and read), one shard at a time: each shard is copied by one Lua call, so the
        pool stops for at most one shard's copy."""
        inserted = int(self._counts()[:, 4].sum())
        write_snapshot(path, snapshot_header(self, inserted), (self._dump_shard(s) for s in range(self.shards)))

    def restore(self, path: str) -> None:
        """Replace the pool's contents with a snapshot (slot count and record layout must match; the
        shard count may differ). LEASED come back READY, FILLING and damaged records as REFILL."""
        header, parts = load_snapshot_for(self, path, self.ranges)
        extra = surplus_inserted(header, parts)
        identity = self.identity()          # restore_begin empties the marker hash: put it back after
        pool_id = uuid.uuid4().hex
        # Per shard: empty it, then add its slots in chunks of about 4 MB (a restore is not a hot
        # path; a draw running meanwhile only sees fewer READY slots, every one of them valid).
        chunk = max(1, (4 << 20) // max(self.record_bytes, 1))
        for s, (arrays, bad) in enumerate(parts):
            lo = arrays.lo
            bad = bad | (arrays.state > 3)
            state = np.where(np.isin(arrays.state, (0, 1)) & ~bad & (arrays.t != EMPTY_T), "R", "F")
            self._run([(s, "restore_begin", None, [self.layout, pool_id, extra if s == 0 else 0, lo, lo + len(arrays),
                                                   self.fmt.record_bytes])])
            for c0 in range(0, len(arrays), chunk):
                c1 = min(len(arrays), c0 + chunk)
                argv: list = [int(bad[c0:c1].sum())]
                records = self.fmt.encode({name: getattr(arrays, name)[c0:c1] for name in self.fmt.fields},
                                          arrays.t[c0:c1], None if arrays.y is None else arrays.y[c0:c1])
                for i in range(c0, c1):
                    keep = not bad[i] and arrays.t[i] != EMPTY_T
                    blob = memoryview(records[i - c0]) if keep else b""
                    argv += [lo + i, str(state[i]), blob, int(arrays.t[i]) if keep else EMPTY_T,
                             int(arrays.uses[i]) if keep else 0, int(arrays.produced_at[i])]
                self._run([(s, "restore_add", None, argv)])
            if bad.any():
                metrics.inc(metrics.POOL_CORRUPT_TOTAL, int(bad.sum()), shard=s)
            if s == 0 and identity is not None:
                self.bind_identity(identity)
        self._claims.clear()
        self._claim_deadlines.clear()

    # --- maintenance ------------------------------------------------------------------

    def reset(self) -> None:
        """Re-initialise every shard: all slots empty REFILL, counters zero (teachers rebuild the pool)."""
        self._init_shards(force=True)
        self._claims.clear()
        self._claim_deadlines.clear()

    def destroy(self) -> None:
        """Delete every key of this pool (benchmarks and tests clean up with it)."""
        for srv in range(len(self._clients)):
            self._drain(srv)        # posted releases run before the keys go, not after (DKDMNOINIT)
        self._redo.clear()          # and one that failed is moot (run again it would re-create a shard)
        for s in range(self.shards):
            srv = self._server(s)
            tag = self.keys(s)[0].rsplit(":", 1)[0]
            keys = self.keys(s)[:len(_KEY_SUFFIXES)]

            def drop():
                c = self._clients[srv]
                groups = list(c.scan_iter(match=f"{tag}:g:*", count=1000))
                c.delete(*keys, *groups)

            self._with_retry(srv, drop)

    def close(self) -> None:
        for c in getattr(self, "_fast_all", []):
            with contextlib.suppress(*_CONN_ERRORS):
                c.drain()           # the replies of posted releases
        if getattr(self, "_redo", None):
            with contextlib.suppress(PoolError):
                self._run([])       # runs them again
        for c in getattr(self, "_fast_all", []) + self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a dead connection is fine
                pass


def _split_draw_reply(r: list) -> tuple[list[bytes], list[bytes], bytes, list]:
    """The draw script's reply -> (slot ids, ages, deadline, counts), the two lists from their strings."""
    def split(x) -> list[bytes]:
        return bytes(x).split(b",") if len(x) else []

    return split(r[0]), split(r[1]), r[2], r[3]


def _rebuild(args: dict) -> RedisPool:
    return RedisPool(**args)
