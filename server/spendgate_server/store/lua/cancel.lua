-- cancel.lua: a Decide answered UNAVAILABLE must leave no state. Its reserve timed out, but
-- a hung Redis may still run it (the script was sent): undo what it recorded, or, when it
-- has not run, leave a tombstone so that it changes nothing when it does (decide.lua).
-- KEYS[1] session hash, KEYS[2] session expiry zset (see _session.lua)
-- ARGV[1] now_ms   ARGV[2] reservation id   ARGV[3] request id ('' = none)
-- ARGV[4] tool calls the reserve added   ARGV[5] fingerprint ('' = dedup off)
-- ARGV[6] due ms of the dedup mark the reserve set   ARGV[7] tombstone ttl ms
-- ARGV[8] session idle ttl ms
-- Reply: {status}
--   0 tombstoned (the reserve had not run), 1 cancelled (what it recorded is undone),
--   2 kept (a retried request id replayed it to a client, or it was settled: a client knows it)
local hkey, zkey = KEYS[1], KEYS[2]
local now, id, request_id = num(ARGV[1]), ARGV[2], ARGV[3]
local tool_count, fingerprint, dedup_until = num(ARGV[4]), ARGV[5], num(ARGV[6])
local tombstone_ttl, session_ttl = num(ARGV[7]), num(ARGV[8])

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
redis.call('HDEL', hkey, 'm:' .. id)
incr(hkey, 'tools', -tool_count)
-- The dedup mark is ours only if no later admission moved it.
if fingerprint ~= '' and num(redis.call('ZSCORE', zkey, 'f:' .. fingerprint)) == dedup_until then
  redis.call('ZREM', zkey, 'f:' .. fingerprint)
end
if request_id ~= '' then
  redis.call('HDEL', hkey, 'q:' .. request_id)
  redis.call('ZREM', zkey, 'q:' .. request_id)
end
touch(hkey, zkey, session_ttl)
return {1}
