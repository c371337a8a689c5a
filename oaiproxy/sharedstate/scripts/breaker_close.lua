-- The probe that the opening ARGV[1] waited for succeeded: closed for the
-- whole group, unless a newer opening replaced it meanwhile.
-- KEYS: as breaker_read.lua
-- ARGV: the opening's gen (0: unknown), this process's id, ms the closed
--       record is kept (so that every process sees it closed)
-- Returns {1} closed, or {0, ms left, gen, told, refused, reason} of the newer
-- opening.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
local s = redis.call('HMGET', KEYS[1], 'until', 'gen', 'told', 'refused', 'reason', 'closed')
if s[1] and s[6] ~= '1' and tonumber(s[2]) ~= tonumber(ARGV[1]) then
  return {0, tonumber(s[1]) - now, tonumber(s[2]), tonumber(s[3]), tonumber(s[4]), s[5]}
end
if s[6] ~= '1' then
  redis.call('HSET', KEYS[1], 'until', string.format('%d', now), 'gen', ARGV[1], 'told', 0, 'refused', 0,
    'reason', 'probe succeeded', 'closed', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1}
