-- Admit one request against a client's limits, atomically, on Redis's clock.
-- KEYS[1]: the client's buckets (hash: r, ra = requests level and its time;
--          t, ta = tokens level and its time; times in ms of Redis's TIME)
-- KEYS[2]: the client's concurrency leases (sorted set: lease id -> expiry ms)
-- ARGV: requests per minute, tokens per minute, concurrent requests (0 = no
--       such limit), the token estimate, the lease in ms, the lease id.
-- Returns integers only (txredisapi parses them without a reactor turn):
--   {status, retry ms (-1: retrying cannot help), requests level,
--    ms until the requests bucket is full, tokens level, ms until full}
-- status: 0 admitted, 1 concurrent, 2 requests, 3 tokens (too large), 4 tokens.
-- The buckets are those of oaiproxy.access.limits.Bucket: capacity C, refilled
-- at C per minute, a level that a settlement may take below zero.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local estimate, lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local stored = redis.call('HMGET', KEYS[1], 'r', 'ra', 't', 'ta')

local function level(value, at, cap)
  if cap <= 0 then return 0 end
  local l = tonumber(value)
  if l == nil then return cap end
  local elapsed = math.max(0, now - (tonumber(at) or now))
  return math.min(cap, l + elapsed * cap / 60000)
end

local function until_full(l, cap)
  if cap <= 0 then return 0 end
  return math.ceil((cap - l) * 60000 / cap)
end

local r = level(stored[1], stored[2], rpm)
local t = level(stored[3], stored[4], tpm)

local function reply(status, retry)
  return {status, retry, math.floor(r), until_full(r, rpm), math.floor(t), until_full(t, tpm)}
end

if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return reply(1, 1000) end
end
if rpm > 0 and r < 1 then return reply(2, math.ceil((1 - r) * 60000 / rpm)) end
if tpm > 0 then
  if estimate > tpm then return reply(3, -1) end
  if t < estimate then return reply(4, math.ceil((estimate - t) * 60000 / tpm)) end
  t = t - estimate
end
if rpm > 0 then r = r - 1 end

local ttl = 1000
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'r', string.format('%.17g', r), 'ra', now)
  ttl = math.max(ttl, until_full(r, rpm) + 1000)
end
if tpm > 0 then
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', t), 'ta', now)
  ttl = math.max(ttl, until_full(t, tpm) + 1000)
end
-- A bucket left alone until full is the same as no key at all: let it go.
if rpm > 0 or tpm > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
if conc > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[6])
  redis.call('PEXPIRE', KEYS[2], lease_ms + 1000)
end
return reply(0, 0)
