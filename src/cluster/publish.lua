if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'epoch', t[1] .. '.' .. t[2])
end
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '0')
local version = math.max(current, floor) + 1
version = math.max(version, tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'version', version, 'doc', ARGV[2], 'published_ms', ARGV[4])
redis.call('PUBLISH', KEYS[3], version)
return version
