-- Give back a reservation the proxy gave up waiting for (budget_admit.lua's
-- reply missed its deadline, or its caller cancelled): the request was
-- decided locally, so what Redis reserved for it must not stay charged.
-- KEYS: those of budget_admit.lua, the request's marker last.  No ARGV.
-- Only if the marker exists (Redis reserved, and nothing settled or released
-- it since): its amounts are subtracted, and it is deleted, so a release
-- sent twice, or for an admission Redis refused or never ran, changes nothing.
-- Returns 1 if something was given back, else 0.
local marker = KEYS[#KEYS]
local s = redis.call('HMGET', marker, 't', 'u')
if not s[1] then return 0 end
for i = 1, #KEYS - 1 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], 't', -tonumber(s[1]))
    redis.call('HINCRBY', KEYS[i], 'u', -(tonumber(s[2]) or 0))
  end
end
redis.call('DEL', marker)
return 1
