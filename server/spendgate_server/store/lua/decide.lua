-- decide.lua: the one atomic, all-or-nothing stateful step of a Decide.
-- KEYS[1] session hash, KEYS[2] session expiry zset (see _session.lua)
-- ARGV[1]  now_ms                  ARGV[2]  reservation id
-- ARGV[3]  estimate (nano-USD)     ARGV[4]  reservation ttl ms
-- ARGV[5]  session idle ttl ms     ARGV[6]  request id ('' = none)
-- ARGV[7]  memo to replay on a retried request id
-- ARGV[8]  fingerprint ('' = dedup off)   ARGV[9]  dedup ttl ms   ARGV[10] dedup shadow (0|1)
-- ARGV[11] tool calls in this request     ARGV[12] tool cap (-1 = off) ARGV[13] tool shadow (0|1)
-- ARGV[14] budget cap nano-USD (-1 = off) ARGV[15] strict (0|1)      ARGV[16] budget shadow (0|1)
-- ARGV[17] what Decide admitted, kept as m:<id> for Settle ('' = none; store/base.py DecidedCall)
-- Reply: {status, spent, reserved, tools, blocked_rule, shadow_mask, memo}
--   status 0 allowed (state recorded), 1 blocked (nothing changed), 2 replayed (nothing changed
--   but the p: mark that a client now knows the reservation), 3 cancelled first (cancel.lua)
--   blocked_rule: 2 session budget, 3 duplicate request, 4 tool-call limit (spendgate.v1.Rule)
--   shadow_mask: 1 dedup, 2 tools, 4 budget fired in shadow mode
local hkey, zkey = KEYS[1], KEYS[2]
local now = num(ARGV[1])
local id, estimate = ARGV[2], num(ARGV[3])
local reservation_ttl, session_ttl = num(ARGV[4]), num(ARGV[5])
local request_id, memo = ARGV[6], ARGV[7]
local fingerprint, dedup_ttl, dedup_shadow = ARGV[8], num(ARGV[9]), ARGV[10] == '1'
local tool_count, tool_cap, tool_shadow = num(ARGV[11]), num(ARGV[12]), ARGV[13] == '1'
local budget_cap, strict, budget_shadow = num(ARGV[14]), ARGV[15] == '1', ARGV[16] == '1'
local decided = ARGV[17] or ''

expire_due(hkey, zkey, now, session_ttl)
local spent, reserved, tools = counters(hkey)

if redis.call('HEXISTS', hkey, 'k:' .. id) == 1 then
  return {3, spent, reserved, tools, 0, 0, ''}
end

if request_id ~= '' then
  local replay = redis.call('HGET', hkey, 'q:' .. request_id)
  if replay then
    redis.call('HSET', hkey, 'p:' .. request_id, 1)
    return {2, spent, reserved, tools, 0, 0, replay}
  end
end

local shadow_mask = 0
-- A rule that fires blocks, unless it is in shadow mode: then it is only reported.
local function enforced(bit, shadow)
  if shadow then
    shadow_mask = shadow_mask + bit
    return false
  end
  return true
end

if fingerprint ~= '' then
  local until_ms = redis.call('ZSCORE', zkey, 'f:' .. fingerprint)
  if until_ms and num(until_ms) > now and enforced(1, dedup_shadow) then
    return {1, spent, reserved, tools, 3, 0, ''}
  end
end

if tool_cap >= 0 and tools + tool_count > tool_cap and enforced(2, tool_shadow) then
  return {1, spent, reserved, tools, 4, 0, ''}
end

if budget_cap >= 0 then
  local committed = spent + reserved
  local over
  if strict then
    over = committed + estimate > budget_cap
  else
    over = committed >= budget_cap
  end
  if over and enforced(4, budget_shadow) then
    return {1, spent, reserved, tools, 2, 0, ''}
  end
end

-- Admitted: record everything at once.
redis.call('HSET', hkey, 'r:' .. id, estimate)
if decided ~= '' then
  redis.call('HSET', hkey, 'm:' .. id, decided)
end
redis.call('ZADD', zkey, now + reservation_ttl, 'r:' .. id)
reserved = incr(hkey, 'reserved', estimate)
tools = incr(hkey, 'tools', tool_count)
if fingerprint ~= '' then
  redis.call('ZADD', zkey, now + dedup_ttl, 'f:' .. fingerprint)
end
if request_id ~= '' then
  redis.call('HSET', hkey, 'q:' .. request_id, memo)
  redis.call('ZADD', zkey, now + reservation_ttl, 'q:' .. request_id)
end
touch(hkey, zkey, session_ttl)
return {0, spent, reserved, tools, 0, shadow_mask, ''}
