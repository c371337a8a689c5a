-- Settle a budget reservation: add what the request cost minus what it
-- reserved (negative gives back) to every period it was reserved in.
-- KEYS: those of budget_admit.lua.  ARGV: tokens to add, nano-USD to add.
-- A key gone (a Redis restart) is left alone: the next admission seeds it
-- from the ledger, which has this request by then.
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 't', ARGV[1])
    redis.call('HINCRBY', key, 'u', ARGV[2])
  end
end
return 0
