-- Settle a reservation: give back the tokens it reserved but did not use
-- (or charge the excess), and free its concurrency lease.
-- KEYS[1]: the client's buckets, KEYS[2]: its leases (see admit.lua)
-- ARGV: tokens per minute (0 = none), tokens to give back (estimate - used;
--       negative charges more), the lease id ('' = none).
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm <= 0 or refund == 0 then return 0 end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local stored = redis.call('HMGET', KEYS[1], 't', 'ta')
local t = tonumber(stored[1])
if t == nil then
  -- Expired (full) or lost with a Redis restart: full is the truth or the
  -- generous side of it; nothing to give back.
  if refund > 0 then return 0 end
  t = tpm
else
  local elapsed = math.max(0, now - (tonumber(stored[2]) or now))
  t = math.min(tpm, t + elapsed * tpm / 60000)
end
t = math.min(tpm, t + refund)
redis.call('HSET', KEYS[1], 't', string.format('%.17g', t), 'ta', now)
local ttl = math.ceil((tpm - t) * 60000 / tpm) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
