"""The Lua scripts of the Redis backend and of ``Publisher``: each one atomic step that the
I/O shell (``hub.dispatch.redis``) runs as is."""

from __future__ import annotations

from typing import Any

from hub.events import Event

MOVED_SUFFIX = ":moved"
EPOCH_SUFFIX = ":epoch"
LEGACY_SUFFIX = ":legacy"
# Written by a re-append that waits for a replica (``WAIT``): when the event is present
# already the script writes nothing, and WAIT would confirm nothing about it.
SYNC_SUFFIX = ":sync"

# Appending one event under the id chosen at its source (``hub.dispatch.ledger.Ids``):
# - "present": that event is in the stream already (a retry or re-append of a command that
#   had run, a journal replayed twice): nothing is appended, so it is delivered once;
# - "added": appended at its id;
# - "stale": the stream has moved past the id and this is a first attempt (nothing was
#   appended; the caller picks a later id, the publish has not been answered yet);
# - "moved": the stream has moved past it while appending after an outage: appended at a
#   new position with the id kept in field ``i`` and recorded in ``<stream>:moved`` (for
#   this check and for resumes from that id). The event keeps the id its publish returned;
# - "reset": Redis lost its data since this instance last looked (``<stream>:epoch`` is not
#   the one it knows): nothing is appended until it has appended its recent events again,
#   so none of its later events overtakes them on another instance.
APPEND = """
if ARGV[6] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[6] then return {'reset', ''} end
local id = ARGV[2]
local found = redis.call('XRANGE', KEYS[1], id, id)
if #found > 0 then
  local fields = found[1][2]
  for k = 1, #fields, 2 do
    if fields[k] == 'e' and fields[k + 1] == ARGV[3] then return {'present', id} end
  end
end
if redis.call('HEXISTS', KEYS[2], id) == 1 then return {'present', id} end
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id,
                          'e', ARGV[3], 'o', ARGV[4])
if type(added) ~= 'table' or not added.err then return {'added', added} end
if not string.find(added.err, 'equal or smaller', 1, true) then return added end
if ARGV[5] ~= '1' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' then return {'stale', info[k + 1]} end
  end
  return {'stale', id}
end
local pos = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                       'e', ARGV[3], 'o', ARGV[4], 'i', id)
redis.call('HSET', KEYS[2], id, pos)
redis.call('PEXPIRE', KEYS[2], 604800000)
return {'moved', pos}
"""

# The legacy channel: every instance receives every PUBLISH, in the same order (Redis
# pushes a message to all subscribers at once). The script keeps a shared count G of the
# messages claimed on the channel and, per subscription, the offset between the
# subscription's own count n and G: message n of a subscription is message n + offset of
# the channel. A message past G is new (this instance appends it and G grows); one at or
# below G was claimed by a quicker instance. Identical payloads are told apart by their
# place in the count, not by their content. A subscription learns its offset at its first
# message (or when a mismatch shows it is misaligned): the oldest message with the same
# digest claimed since the subscription started (Redis time read before SUBSCRIBE: older
# claims are of messages it never received) and within LEGACY_ALIGN_MS is taken to be the
# same one, else it is new.
CLAIM_LEGACY = """
local n = tonumber(ARGV[3])
local d = ARGV[4]
local logsize = tonumber(ARGV[7])
local count, log, offsets = KEYS[2] .. ':count', KEYS[2] .. ':log', KEYS[2] .. ':offsets'
local G = tonumber(redis.call('GET', count) or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local g = nil
local off = redis.call('HGET', offsets, ARGV[2])
if off then
  g = n + tonumber(off)
  if g <= G then
    local claimed = redis.call('HGET', log, g)
    if claimed and string.sub(claimed, 1, #d) ~= d then g = nil end
  elseif g > G + 1 then
    g = nil
  end
end
if not g then
  g = G + 1
  for k = G, math.max(1, G - logsize + 1), -1 do
    local claimed = redis.call('HGET', log, k)
    if not claimed then break end
    local cd, ms = string.match(claimed, '^(%x+):(%d+)$')
    if tonumber(ms) < math.max(tonumber(ARGV[6]), now - tonumber(ARGV[8])) then break end
    if cd == d then g = k end
  end
  redis.call('HSET', offsets, ARGV[2], g - n)
  redis.call('PEXPIRE', offsets, 86400000)
end
if g <= G then return 'duplicate' end
redis.call('SET', count, g)
redis.call('HSET', log, g, d .. ':' .. now)
redis.call('HDEL', log, g - logsize)
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[5])
end
return 'appended'
"""
LEGACY_ALIGN_MS = 1000
LEGACY_LOG = 1000


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def append_event(script: Any, key: str, maxlen: int, event: Event, origin: str, *,
                       relocate: bool, epoch: str | None = None) -> tuple[str, str]:
    """Run :data:`APPEND` for ``event``; returns (outcome, id or stream position).
    ``epoch``: the dataset the caller knows (None: do not check)."""
    reply = await script(keys=[key, key + MOVED_SUFFIX, key + EPOCH_SUFFIX],
                         args=[maxlen, event.id, event.body(), origin, "1" if relocate else "0",
                               epoch or ""])
    return _str(reply[0]), _str(reply[1])
