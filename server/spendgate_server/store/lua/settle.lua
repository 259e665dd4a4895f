-- settle.lua: replace a reservation with the cost actually counted; idempotent.
-- The header is checked against SETTLE in store/redis.py, which builds the ARGV.
-- KEYS[1] hkey                 the session hash (see _session.lua)
-- KEYS[2] zkey                 the session's expiry zset
-- ARGV[1] now_ms               the caller's clock, Unix ms
-- ARGV[2] reservation_id       the reservation to settle
-- ARGV[3] cost_nano_usd        the cost to count (0 releases)
-- ARGV[4] settled_ttl_ms       how long the settled id is remembered
-- ARGV[5] session_ttl_ms       idle sessions are forgotten after this
-- ARGV[6] release_dedup        0|1: the provider refused the call; remove the dedup mark its
--                              admission set, if no later admission renewed it
-- Reply: {status, cost, spent, reserved, decided}
--   decided: what Decide admitted (a:<id>, kept until the settle record is forgotten; '' if none)
--   status 0 settled, 1 already settled (nothing changed), 2 unknown id (nothing changed)
local hkey, zkey = unpack(KEYS)
local now_ms, reservation_id, cost_nano_usd, settled_ttl_ms, session_ttl_ms, release_dedup = unpack(ARGV)
local now, id, cost = num(now_ms), reservation_id, num(cost_nano_usd)
local settled_ttl, session_ttl = num(settled_ttl_ms), num(session_ttl_ms)

expire_due(hkey, zkey, now, session_ttl)

local decided = redis.call('HGET', hkey, 'a:' .. id) or ''
local previous = redis.call('HGET', hkey, 'd:' .. id)
if previous then
  local spent, reserved = counters(hkey)
  return {1, num(previous), spent, reserved, decided}
end

local open = redis.call('HGET', hkey, 'r:' .. id)
local expired = redis.call('HGET', hkey, 'x:' .. id)
if open then
  redis.call('HDEL', hkey, 'r:' .. id)
  redis.call('ZREM', zkey, 'r:' .. id)
  incr(hkey, 'reserved', -num(open))
  incr(hkey, 'spent', cost)
elseif expired then
  -- It was counted at its estimate when it expired; correct to the real cost.
  redis.call('HDEL', hkey, 'x:' .. id)
  redis.call('ZREM', zkey, 'x:' .. id)
  incr(hkey, 'spent', cost - num(expired))
else
  local spent, reserved = counters(hkey)
  return {2, 0, spent, reserved, ''}
end
local mark = redis.call('HGET', hkey, 'm:' .. id)
if mark then
  redis.call('HDEL', hkey, 'm:' .. id)
  if release_dedup == '1' then
    local sep = string.find(mark, ':', 1, true)
    local due, member = string.sub(mark, 1, sep - 1), 'f:' .. string.sub(mark, sep + 1)
    local score = redis.call('ZSCORE', zkey, member)
    if score and tonumber(score) == tonumber(due) then
      redis.call('ZREM', zkey, member)
    end
  end
end
redis.call('HSET', hkey, 'd:' .. id, cost)
redis.call('ZADD', zkey, now + settled_ttl, 'd:' .. id)
touch(hkey, zkey, session_ttl)
local spent, reserved = counters(hkey)
return {0, cost, spent, reserved, decided}
