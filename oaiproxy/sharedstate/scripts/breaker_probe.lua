-- Take (or keep) the right to send the group's one probe of an upstream: a
-- lease (SET NX PX).  Not while the group's cooldown runs, unless the probe is
-- early (every candidate open) and the cooldown is the proxy's own guess.
-- KEYS: as breaker_read.lua
-- ARGV: this process's id, the lease in ms, early (0/1)
-- Returns {1, lease ms, gen} taken; {0, ms left of the open, gen} not yet;
--         {-1, ms left of the lease, gen} another process probes.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'until', 'gen', 'told', 'closed')
local gen = 0
if s[1] and s[4] ~= '1' then
  gen = tonumber(s[2])
  local left = tonumber(s[1]) - now
  if left > 0 and (ARGV[3] ~= '1' or s[3] == '1') then return {0, left, gen} end
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {-1, redis.call('PTTL', KEYS[2]), gen} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, tonumber(ARGV[2]), gen}
