-- settle.lua: replace a reservation with the cost actually counted; idempotent.
-- KEYS[1] session hash, KEYS[2] session expiry zset (see _session.lua)
-- ARGV[1] now_ms   ARGV[2] reservation id   ARGV[3] cost nano-USD (0 releases)
-- ARGV[4] how long to remember the settled id, ms   ARGV[5] session idle ttl ms
-- Reply: {status, cost counted, spent, reserved, what Decide admitted (m:<id>, '' if none)}
--   status 0 settled, 1 already settled (nothing changed), 2 unknown id (nothing changed)
local hkey, zkey = KEYS[1], KEYS[2]
local now, id, cost = num(ARGV[1]), ARGV[2], num(ARGV[3])
local settled_ttl, session_ttl = num(ARGV[4]), num(ARGV[5])

expire_due(hkey, zkey, now, session_ttl)

local decided = redis.call('HGET', hkey, 'm:' .. id) or ''
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
redis.call('HSET', hkey, 'd:' .. id, cost)
redis.call('ZADD', zkey, now + settled_ttl, 'd:' .. id)
touch(hkey, zkey, session_ttl)
local spent, reserved = counters(hkey)
return {0, cost, spent, reserved, decided}
