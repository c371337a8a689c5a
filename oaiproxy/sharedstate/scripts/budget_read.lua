-- Read a client's totals (KEYS: those of budget_admit.lua).
-- Returns, for each key, {1 if it exists else 0, tokens, nano-USD}, flattened.
local out = {}
for _, key in ipairs(KEYS) do
  local s = redis.call('HMGET', key, 't', 'u')
  if s[1] then
    table.insert(out, 1)
    table.insert(out, tonumber(s[1]))
    table.insert(out, tonumber(s[2]) or 0)
  else
    table.insert(out, 0)
    table.insert(out, 0)
    table.insert(out, 0)
  end
end
return out
