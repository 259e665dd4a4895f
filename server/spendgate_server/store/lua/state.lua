-- state.lua: a session's counters, with due reservations counted first.
-- The header is checked against STATE in store/redis.py, which builds the ARGV.
-- KEYS[1] hkey                 the session hash (see _session.lua)
-- KEYS[2] zkey                 the session's expiry zset
-- ARGV[1] now_ms               the caller's clock, Unix ms
-- ARGV[2] session_ttl_ms       how long an expired reservation is remembered
-- Reply: {spent, reserved, tools, open_reservations}
local hkey, zkey = unpack(KEYS)
local now_ms, session_ttl_ms = unpack(ARGV)
expire_due(hkey, zkey, num(now_ms), num(session_ttl_ms))
local spent, reserved, tools = counters(hkey)
local open = 0
for _, member in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
  if string.sub(member, 1, 2) == 'r:' then
    open = open + 1
  end
end
return {spent, reserved, tools, open}
