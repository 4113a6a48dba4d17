#!lua name=isrgate
-- The one implementation of "invalidate these tags" for the whole fleet (README "Revalidating
-- from inside your app"): every gateway loads this library at start and again whenever Redis
-- comes back, and calls it for a webhook or a CLI purge; every Next.js replica running
-- `@isrgate/next` calls the same function for an in-app revalidateTag / revalidatePath /
-- res.revalidate. Where Functions are missing (Redis < 7) the gateway sends the same text as a
-- script instead (without its first line, ending in the `else` branch below).
--
-- KEYS[1] = isr:inv; ARGV = origin (a gateway id or `next:<host>:<pid>`), mode (`soft` or
-- `hard`), the bus channel, the caller's newest known epoch, then the tags.
--
-- The new epoch is the greatest of: the stored counter + 1, the server's clock in
-- milliseconds, and the caller's newest known epoch + 1. The clock is what survives a Redis
-- that comes back empty (restarted without persistence, failed over to an empty replica,
-- FLUSHALL): the counter would start again at 1 while running gateways keep stamping entries
-- with the epoch they knew, and every purge would be older than the pages it should remove.
-- The caller's epoch covers a new primary whose clock is behind the old one's.
--
-- The record (fields `s:<tag>` / `h:<tag>` of isr:inv, so no tag collides with `_epoch` and a
-- soft purge never overwrites a hard one) and the `inv` message on the bus are written
-- together: no gateway or replica sees one without the other. Returns the epoch.
local function invalidate(KEYS, ARGV)
  local t = redis.call('TIME')
  local e = tonumber(redis.call('HGET', KEYS[1], '_epoch') or '0') + 1
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now > e then e = now end
  local known = tonumber(ARGV[4]) + 1
  if known > e then e = known end
  e = string.format('%.0f', e)
  redis.call('HSET', KEYS[1], '_epoch', e)
  local prefix = (ARGV[2] == 'hard') and 'h:' or 's:'
  for i = 5, #ARGV do redis.call('HSET', KEYS[1], prefix .. ARGV[i], e) end
  redis.call('PUBLISH', ARGV[3], 'inv ' .. e .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. table.concat(ARGV, ' ', 5))
  return e
end

if redis.register_function then
  redis.register_function('isrgate_invalidate_v1', invalidate)
else
  if redis.replicate_commands then redis.replicate_commands() end
  return invalidate(KEYS, ARGV)
end
