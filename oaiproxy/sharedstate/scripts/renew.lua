-- Renew a running request's concurrency lease: it is still running, so it
-- holds its slot again even if the lease was lost (a Redis restart).
-- KEYS[1]: the client's leases (see admit.lua); ARGV: lease id, lease ms.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) + 1000 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
end
return 1
