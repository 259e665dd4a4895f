-- cancel.lua: a Decide answered UNAVAILABLE must leave no state. Its reserve timed out, but
-- a hung Redis may still run it (the script was sent): undo what it recorded, or, when it
-- has not run, leave a tombstone so that it changes nothing when it does (decide.lua).
-- The header is checked against CANCEL in store/redis.py, which builds the ARGV.
-- KEYS[1] hkey                 the session hash (see _session.lua)
-- KEYS[2] zkey                 the session's expiry zset
-- ARGV[1] now_ms               the caller's clock, Unix ms
-- ARGV[2] reservation_id       the reservation the unanswered reserve would record
-- ARGV[3] request_id           its idempotency key ('' = none)
-- ARGV[4] tool_call_count      tool calls the reserve added
-- ARGV[5] tombstone_ttl_ms     how long a reserve of this id arriving later is refused
-- ARGV[6] session_ttl_ms       idle sessions are forgotten after this
-- Reply: {status}
--   0 tombstoned (the reserve had not run), 1 cancelled (what it recorded is undone),
--   2 kept (a retried request id replayed it to a client, or it was settled: a client knows it)
local hkey, zkey = unpack(KEYS)
local now_ms, reservation_id, request_id, tool_call_count, tombstone_ttl_ms, session_ttl_ms = unpack(ARGV)
local now, id, tool_count = num(now_ms), reservation_id, num(tool_call_count)
local tombstone_ttl, session_ttl = num(tombstone_ttl_ms), num(session_ttl_ms)

expire_due(hkey, zkey, now, session_ttl)

if redis.call('HEXISTS', hkey, 'd:' .. id) == 1
    or (request_id ~= '' and redis.call('HEXISTS', hkey, 'p:' .. request_id) == 1) then
  return {2}
end
local open = redis.call('HGET', hkey, 'r:' .. id)
local expired = redis.call('HGET', hkey, 'x:' .. id)
if not open and not expired then
  redis.call('HSET', hkey, 'k:' .. id, 1)
  redis.call('ZADD', zkey, now + tombstone_ttl, 'k:' .. id)
  touch(hkey, zkey, session_ttl)
  return {0}
end
if open then
  redis.call('HDEL', hkey, 'r:' .. id)
  redis.call('ZREM', zkey, 'r:' .. id)
  incr(hkey, 'reserved', -num(open))
else
  -- It expired unsettled and was counted at its estimate: take that back.
  redis.call('HDEL', hkey, 'x:' .. id)
  redis.call('ZREM', zkey, 'x:' .. id)
  incr(hkey, 'spent', -num(expired))
end
incr(hkey, 'tools', -tool_count)
-- The dedup mark this admission set, unless a later admission renewed it (as settle.lua).
local mark = redis.call('HGET', hkey, 'm:' .. id)
if mark then
  local sep = string.find(mark, ':', 1, true)
  local due, member = string.sub(mark, 1, sep - 1), 'f:' .. string.sub(mark, sep + 1)
  local score = redis.call('ZSCORE', zkey, member)
  if score and tonumber(score) == tonumber(due) then
    redis.call('ZREM', zkey, member)
  end
end
redis.call('HDEL', hkey, 'm:' .. id, 'a:' .. id)
if request_id ~= '' then
  redis.call('HDEL', hkey, 'q:' .. request_id)
  redis.call('ZREM', zkey, 'q:' .. request_id)
end
touch(hkey, zkey, session_ttl)
return {1}
