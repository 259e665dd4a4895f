-- _session.lua: helpers prepended to every script (not a script of its own).
--
-- A session lives in two keys under one hash tag, so every script is single-slot
-- (store/keyspace.py encodes tenant and session id):
--   KEYS[1] sg:ses:{tenant:session}      HASH  spent, reserved, tools (integers, nano-USD / count)
--                                               r:<id> estimate of an open reservation
--                                               x:<id> estimate of a reservation that expired unsettled
--                                               d:<id> cost counted when <id> was settled
--                                               q:<request_id> memo of an admitted decision
--                                               m:<id> "<due ms>:<fingerprint>" of the dedup mark
--                                                      <id>'s admission set (until settled or forgotten)
--                                               a:<id> what Decide admitted (model, estimate, tokens;
--                                                      store/base.py DecidedCall), kept until the id's
--                                                      x: or d: record is forgotten
--                                               k:<id> tombstone of a reserve cancelled before it ran
--                                               p:<request_id> the memo was replayed to a client
--   KEYS[2] sg:ses:{tenant:session}:exp  ZSET  member -> Unix ms when it falls due:
--                                               r:<id> reservation expiry, f:<fingerprint> dedup expiry,
--                                               x:/d:/q:/k: records to forget
-- Times come from the caller (ARGV), never from the Redis clock, so tests need no sleeping.

local MAX_DUE_PER_CALL = 256

local function num(value)
  return tonumber(value) or 0
end

-- HINCRBY by a Lua number; a zero delta is skipped, since Lua renders -0 as "-0", which
-- Redis refuses as an integer.
local function incr(hkey, field, delta)
  if delta ~= 0 then
    return redis.call('HINCRBY', hkey, field, delta)
  end
  return num(redis.call('HGET', hkey, field))
end

-- Count reservations that fell due as spent at their estimate; forget due records.
local function expire_due(hkey, zkey, now, forget_ms)
  local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, MAX_DUE_PER_CALL)
  if #due == 0 then
    return
  end
  redis.call('ZREM', zkey, unpack(due))
  for _, member in ipairs(due) do
    local kind = string.sub(member, 1, 1)
    if kind == 'r' then
      local estimate = redis.call('HGET', hkey, member)
      if estimate then
        local id = string.sub(member, 3)
        redis.call('HDEL', hkey, member)
        incr(hkey, 'reserved', -num(estimate))
        incr(hkey, 'spent', num(estimate))
        redis.call('HSET', hkey, 'x:' .. id, estimate)
        redis.call('ZADD', zkey, now + forget_ms, 'x:' .. id)
      end
    elseif kind == 'x' then
      redis.call('HDEL', hkey, member, 'm:' .. string.sub(member, 3), 'a:' .. string.sub(member, 3))
    elseif kind == 'd' then
      redis.call('HDEL', hkey, member, 'a:' .. string.sub(member, 3))
    elseif kind == 'q' then
      redis.call('HDEL', hkey, member, 'p:' .. string.sub(member, 3))
    elseif kind ~= 'f' then
      redis.call('HDEL', hkey, member)
    end
  end
end

local function counters(hkey)
  local v = redis.call('HMGET', hkey, 'spent', 'reserved', 'tools')
  return num(v[1]), num(v[2]), num(v[3])
end

local function touch(hkey, zkey, session_ttl_ms)
  redis.call('PEXPIRE', hkey, session_ttl_ms)
  redis.call('PEXPIRE', zkey, session_ttl_ms)
end
