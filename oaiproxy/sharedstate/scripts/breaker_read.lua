-- Read one upstream's breaker as the group sees it, and renew this process's
-- probe lease while its probe runs.
-- KEYS[1]: the breaker (hash: until = open until, ms of Redis's TIME; gen = the
--          opening's id, its µs of TIME; told, refused = 0/1; reason; closed = 1
--          once the opening's probe succeeded, kept a while so all see it)
-- KEYS[2]: the probe lease (string: its holder's id, expiring with PX)
-- ARGV: this process's id, the ms to renew its lease by (0: no renewal)
-- Returns {kind (0 none, 1 open, 2 closed), ms left of the open (<= 0: its
--          cooldown is over, the group waits on the probe), gen, told, refused,
--          ms left of the probe lease (-1: none), 1 if the lease is ours, reason}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local holder = redis.call('GET', KEYS[2])
local probe, mine = -1, 0
if holder then
  if holder == ARGV[1] then
    mine = 1
    if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
  end
  probe = redis.call('PTTL', KEYS[2])
end
local s = redis.call('HMGET', KEYS[1], 'until', 'gen', 'told', 'refused', 'reason', 'closed')
if not s[1] then return {0, 0, 0, 0, 0, probe, mine, ''} end
local kind = 1
if s[6] == '1' then kind = 2 end
return {kind, tonumber(s[1]) - now, tonumber(s[2]), tonumber(s[3]), tonumber(s[4]), probe, mine, s[5] or ''}
