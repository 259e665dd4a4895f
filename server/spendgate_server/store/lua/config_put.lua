-- config_put.lua: compare-and-set write of one tenant's (or project's) config, with history.
-- KEYS[1] sg:cfg:{<tenant>}            HASH  v (tenant-wide version counter),
--                                             e:<project> version of the current config (its etag),
--                                             p:<project> current record (JSON)
-- KEYS[2] sg:cfg:{<tenant>}:h:<project> LIST  records, newest first, bounded
--   (ids encoded as in store/keyspace.py; policies use sg:pol: in place of sg:cfg:)
-- ARGV[1] project ('' = tenant-wide)   ARGV[2] expected etag ('' = must not exist yet)
-- ARGV[3] config JSON                   ARGV[4] actor   ARGV[5] now_ms
-- ARGV[6] history length kept           ARGV[7] channel to publish the change on
-- ARGV[8] tenant (the message published)
-- Reply: {1, version} written, or {0, current etag} on an etag mismatch (nothing changed)
local hkey, history = KEYS[1], KEYS[2]
local project, expected = ARGV[1], ARGV[2]
local current = redis.call('HGET', hkey, 'e:' .. project) or ''
if current ~= expected then
  return {0, current}
end
local version = redis.call('HINCRBY', hkey, 'v', 1)
local record = cjson.encode({
  project = project, config = ARGV[3], version = version,
  updated_by = ARGV[4], update_time_ms = tonumber(ARGV[5]),
})
redis.call('HSET', hkey, 'e:' .. project, tostring(version), 'p:' .. project, record)
redis.call('LPUSH', history, record)
redis.call('LTRIM', history, 0, tonumber(ARGV[6]) - 1)
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {1, version}
