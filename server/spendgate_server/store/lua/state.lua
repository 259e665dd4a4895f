-- state.lua: a session's counters, with due reservations counted first.
-- KEYS[1] session hash, KEYS[2] session expiry zset (see _session.lua)
-- ARGV[1] now_ms   ARGV[2] session idle ttl ms (how long an expired reservation is remembered)
-- Reply: {spent, reserved, tools, open reservations}
local hkey, zkey = KEYS[1], KEYS[2]
expire_due(hkey, zkey, num(ARGV[1]), num(ARGV[2]))
local spent, reserved, tools = counters(hkey)
local open = 0
for _, member in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  if string.sub(member, 1, 2) == 'r:' then
    open = open + 1
  end
end
return {spent, reserved, tools, open}
