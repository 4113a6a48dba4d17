#!lua name=isrgate
-- The one implementation of "invalidate these tags" for the whole fleet (README "Revalidating
-- from inside your app"): every gateway loads this library at start and again whenever Redis
-- comes back, and calls it for a webhook or a CLI purge; every Next.js replica running
-- `@isrgate/next` calls the same function for an in-app revalidateTag / revalidatePath /
-- res.revalidate. Where Functions are missing (Redis < 7) the gateway sends the same text as a
-- script instead (without its first line, ending in the `else` branch below).
--
-- KEYS[1] = isr:inv, KEYS[2] = its index isr:{isr:inv}:z (same cluster slot: the hash tag is
-- the first key's whole name); ARGV = origin (a gateway id or `next:<host>:<pid>`), mode (`soft` or
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
-- soft purge never overwrites a hard one), its entry in the index (a sorted set: member the
-- field, score the epoch; what a starting gateway reads after the snapshot, see
-- src/invalidate/load.rs) and the `inv` message on the bus are written together: no gateway or
-- replica sees one without the other. Returns the epoch.
--
-- `_indexed` is the epoch of the newest write that went into the index. A write by an older
-- library (`isrgate_invalidate_v1` before the index, which an older gateway may load again at
-- any time during a rolling upgrade) moves `_epoch` and not `_indexed`; the next write here
-- sees that and raises `_unindexed` to the newest such epoch, so a reader knows the index may
-- miss records up to there and reads the whole hash instead. The same when the index is gone
-- while it should hold the writes since the snapshot (`_snapped`): evicted (allkeys-lru) or
-- deleted.
local function invalidate(KEYS, ARGV)
  local inv = KEYS[1]
  local index = KEYS[2] or ('isr:{' .. inv .. '}:z')
  local t = redis.call('TIME')
  local was = redis.call('HMGET', inv, '_epoch', '_indexed', '_snapped')
  local counter = tonumber(was[1] or '0')
  local indexed = tonumber(was[2] or '0')
  if counter > indexed
     or (indexed > tonumber(was[3] or '0') and redis.call('EXISTS', index) == 0) then
    redis.call('HSET', inv, '_unindexed', was[1])
  end
  local e = counter + 1
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now > e then e = now end
  local known = tonumber(ARGV[4]) + 1
  if known > e then e = known end
  e = string.format('%.0f', e)
  redis.call('HSET', inv, '_epoch', e, '_indexed', e)
  local prefix = (ARGV[2] == 'hard') and 'h:' or 's:'
  for i = 5, #ARGV do
    local field = prefix .. ARGV[i]
    redis.call('HSET', inv, field, e)
    redis.call('ZADD', index, e, field)
  end
  redis.call('PUBLISH', ARGV[3], 'inv ' .. e .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. table.concat(ARGV, ' ', 5))
  return e
end

-- v2 declares both keys. v1 (one key, the index named from it) stays for the callers from
-- before the index: older gateways and @isrgate/next packages keep working, and their writes
-- are indexed too while this library is the one loaded.
if redis.register_function then
  redis.register_function('isrgate_invalidate_v2', invalidate)
  redis.register_function('isrgate_invalidate_v1', invalidate)
else
  if redis.replicate_commands then redis.replicate_commands() end
  return invalidate(KEYS, ARGV)
end
