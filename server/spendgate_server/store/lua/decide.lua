-- decide.lua: the one atomic, all-or-nothing stateful step of a Decide.
-- The header is checked against DECIDE in store/redis.py, which builds the ARGV.
-- KEYS[1] hkey                 the session hash (see _session.lua)
-- KEYS[2] zkey                 the session's expiry zset
-- ARGV[1]  now_ms              the caller's clock, Unix ms
-- ARGV[2]  reservation_id      id of the reservation to record
-- ARGV[3]  estimate_nano_usd   what the call reserves
-- ARGV[4]  reservation_ttl_ms  an unsettled reservation counts at its estimate after this
-- ARGV[5]  session_ttl_ms      idle sessions are forgotten after this
-- ARGV[6]  request_id          idempotency key ('' = none)
-- ARGV[7]  memo                what a retried request id replays
-- ARGV[8]  fingerprint         the request's fingerprint ('' = dedup off)
-- ARGV[9]  dedup_ttl_ms        how long an admitted fingerprint blocks its duplicates
-- ARGV[10] dedup_shadow        0|1: dedup only reports
-- ARGV[11] tool_call_count     tool calls in this request
-- ARGV[12] tool_cap            max tool calls per session (-1 = off)
-- ARGV[13] tool_shadow         0|1: the tool limit only reports
-- ARGV[14] budget_cap_nano_usd the session budget (-1 = off)
-- ARGV[15] budget_strict       0|1: strict mode (else crossing)
-- ARGV[16] budget_shadow       0|1: the budget only reports
-- ARGV[17] decided             what Decide admitted, kept as a:<id> for Settle ('' = none)
-- Reply: {status, spent, reserved, tools, blocked_rule, shadow_mask, memo}
--   status 0 allowed (state recorded), 1 blocked (nothing changed), 2 replayed (nothing changed
--   but the p: mark that a client now knows the reservation), 3 cancelled before it ran
--   (a tombstone left by cancel.lua: nothing changed)
--   blocked_rule: 2 session budget, 3 duplicate request, 4 tool-call limit (spendgate.v1.Rule)
--   shadow_mask: 1 dedup, 2 tools, 4 budget fired in shadow mode
local hkey, zkey = unpack(KEYS)
local now_ms, reservation_id, estimate_nano_usd, reservation_ttl_ms, session_ttl_ms, request_id, memo,
  fingerprint, dedup_ttl_ms, dedup_shadow, tool_call_count, tool_cap, tool_shadow,
  budget_cap_nano_usd, budget_strict, budget_shadow, decided = unpack(ARGV)
local now, id, estimate = num(now_ms), reservation_id, num(estimate_nano_usd)
local reservation_ttl, session_ttl = num(reservation_ttl_ms), num(session_ttl_ms)
local dedup_ttl, dedup_shadowed = num(dedup_ttl_ms), dedup_shadow == '1'
local tool_count, tools_cap, tool_shadowed = num(tool_call_count), num(tool_cap), tool_shadow == '1'
local budget_cap, strict, budget_shadowed = num(budget_cap_nano_usd), budget_strict == '1', budget_shadow == '1'

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
  if until_ms and num(until_ms) > now and enforced(1, dedup_shadowed) then
    return {1, spent, reserved, tools, 3, 0, ''}
  end
end

if tools_cap >= 0 and tools + tool_count > tools_cap and enforced(2, tool_shadowed) then
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
  if over and enforced(4, budget_shadowed) then
    return {1, spent, reserved, tools, 2, 0, ''}
  end
end

-- Admitted: record everything at once.
redis.call('HSET', hkey, 'r:' .. id, estimate)
if decided ~= '' then
  redis.call('HSET', hkey, 'a:' .. id, decided)
end
redis.call('ZADD', zkey, now + reservation_ttl, 'r:' .. id)
reserved = incr(hkey, 'reserved', estimate)
tools = incr(hkey, 'tools', tool_count)
if fingerprint ~= '' then
  local due = string.format('%.0f', now + dedup_ttl)
  redis.call('ZADD', zkey, due, 'f:' .. fingerprint)
  -- So a settle of a refused call can remove this mark (and only this one).
  redis.call('HSET', hkey, 'm:' .. id, due .. ':' .. fingerprint)
end
if request_id ~= '' then
  redis.call('HSET', hkey, 'q:' .. request_id, memo)
  redis.call('ZADD', zkey, now + reservation_ttl, 'q:' .. request_id)
end
touch(hkey, zkey, session_ttl)
return {0, spent, reserved, tools, 0, shadow_mask, ''}
