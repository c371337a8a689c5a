-- Check every budget of a request and reserve its most in all of them, or in
-- none, atomically.
-- KEYS[i]: the client's total in one period (hash: t = tokens, u = nano-USD);
--          its current day, then its current month (one hash tag: one slot);
--          last, the request's marker (hash: t, u reserved), same hash tag.
-- ARGV: the reservation's tokens, its nano-USD; then for each key: the token
--       budget (-1: none), the nano-USD budget (-1: none), the ledger's total
--       to start from if the key is absent (tokens, nano-USD), and when the
--       key expires (Unix ms: the period's end plus a margin); last, how
--       long the marker lives (ms).
-- The marker records what was reserved, so that budget_release.lua can give
-- it back if the proxy gave up waiting for this reply (a missed deadline, a
-- cancelled caller) while Redis still ran the script.
-- A key is created from the ledger's total only when absent: of several
-- processes starting at once, the first seeds it and the others add to it.
-- Returns integers only: {0, 0} reserved; {i, 1} over the token budget of
-- KEYS[i], {i, 2} over its dollar budget (nothing reserved).
local ct, cu = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #KEYS - 1
local marker = KEYS[#KEYS]
for i = 1, n do
  local key = KEYS[i]
  local a = 2 + (i - 1) * 5
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 't', ARGV[a + 3], 'u', ARGV[a + 4])
    redis.call('PEXPIREAT', key, ARGV[a + 5])
  end
  local s = redis.call('HMGET', key, 't', 'u')
  local t, u = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  local lt, lu = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if lt >= 0 and t + ct > lt then return {i, 1} end
  if lu >= 0 and u + cu > lu then return {i, 2} end
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 't', ct)
  redis.call('HINCRBY', KEYS[i], 'u', cu)
end
redis.call('HSET', marker, 't', ct, 'u', cu)
redis.call('PEXPIRE', marker, ARGV[2 + n * 5 + 1])
return {0, 0}
