-- Publish an opening: the upstream is open for the whole group for ARGV[1] ms
-- from now on Redis's clock, or longer if it already was: an open is only ever
-- extended.  A new opening (none before, a closed one, or one whose cooldown
-- is over: its probe failed) gets a new gen; this process's probe lease goes.
-- KEYS: as breaker_read.lua
-- ARGV: cooldown ms, told (0/1), refused (0/1), reason, this process's id,
--       ms the record outlives the open
-- Returns {ms left of the open, gen, told, refused}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local gen = tonumber(time[1]) * 1000000 + tonumber(time[2])
local until_ms = now + tonumber(ARGV[1])
local told, refused, reason = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local s = redis.call('HMGET', KEYS[1], 'until', 'gen', 'told', 'refused', 'reason', 'closed')
if s[1] and s[6] ~= '1' and tonumber(s[1]) > now then
  gen = tonumber(s[2])
  if tonumber(s[1]) >= until_ms then
    until_ms, reason = tonumber(s[1]), s[5]
  end
  told = math.max(told, tonumber(s[3]))
  refused = math.max(refused, tonumber(s[4]))
end
if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[1], 'until', string.format('%d', until_ms), 'gen', string.format('%d', gen),
  'told', told, 'refused', refused, 'reason', reason, 'closed', 0)
redis.call('PEXPIRE', KEYS[1], math.max(1, until_ms - now) + tonumber(ARGV[6]))
return {until_ms - now, gen, told, refused}
