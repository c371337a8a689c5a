-- Settle a budget reservation: add what the request cost minus what it
-- reserved (negative gives back) to every period it was reserved in.
-- KEYS: those of budget_admit.lua (the marker last: deleted, the request is
-- settled and nothing is to be released).  ARGV: tokens, nano-USD to add.
-- A key gone (a Redis restart) is left alone: the next admission seeds it
-- from the ledger, which has this request by then.
for i = 1, #KEYS - 1 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], 't', ARGV[1])
    redis.call('HINCRBY', KEYS[i], 'u', ARGV[2])
  end
end
redis.call('DEL', KEYS[#KEYS])
return 0
