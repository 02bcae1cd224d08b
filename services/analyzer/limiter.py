"""Gemini quota shared by every analyzer replica, and each process's adaptive concurrency.

Google meters the Gemini API per Google Cloud project and model: requests per minute (RPM),
input tokens per minute (TPM) and requests per day (RPD, reset at midnight Pacific time);
all the API keys of a project draw on the same quota. ``QuotaGate`` keeps, in Redis, per
(project, model):

* a sliding window of the requests admitted in the last ``window_s + margin_s`` seconds
  (a sorted set, member ``id|tokens``, score = admission time) and their token sum: at most
  RPM requests and TPM tokens in any window, whatever the number of replicas. The margin
  (default 1 s of a 60 s window) absorbs the time between admission here and arrival at
  Google, so that Google's own window never sees more than the limit;
* a GCRA pacing time: admissions are spread evenly (one per ``window / RPM``, with up to
  ``burst_s`` seconds of catch-up) instead of the whole minute's quota at once, which real
  quota systems answer with 429s and which would make the window empty out in steps;
* a day counter per Pacific date (RPD), and a back-off flag set on a 429 with the server's
  ``RetryInfo.retryDelay`` as its TTL: nobody sends to that project and model before it ends.

One Lua script admits a request atomically into the least recently used project that has
room (so load spreads over projects), or returns how long until the first one will. Redis
supplies the clock (``TIME``), so replicas on machines with skewed clocks agree.

Libraries considered: aiolimiter (a leaky bucket) and similar limiters keep their state in
one process, so N replicas would each spend the whole quota; the Redis-backed ``limits``
package has moving windows but no "how long until there is room" answer, no weighting by
tokens across several limits at once and no choice between projects in one atomic step.
Hence this script.

Within a process, one task per model polls Redis at a time (``asyncio.Lock``, FIFO); the
others queue behind it, so waiting requests cost one Redis call per admission, not one per
waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prometheus_client import Gauge, Histogram
from redis.asyncio import Redis

from imagestream.common.keys import Keys

QUOTA_WAIT_SECONDS = Histogram(
    "imagestream_gemini_quota_wait_seconds",
    "Time a Gemini request waited for quota (RPM/TPM/RPD, pacing, 429 back-off).",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CONCURRENCY_LIMIT = Gauge(
    "imagestream_gemini_concurrency_limit",
    "Gemini requests this process may have in flight (adapted to latency and overload).",
)

try:
    PACIFIC: dt.tzinfo = ZoneInfo("America/Los_Angeles")
except ZoneInfoNotFoundError:  # a slim image without tzdata: standard time all year
    PACIFIC = dt.timezone(dt.timedelta(hours=-8))

# Admit one request into the first (least recently used) project with room.
#   KEYS: five per project: rate (zset), tokens, pace, day, backoff
#   ARGV[1] projects, ARGV[2] window ms, ARGV[3] tokens, ARGV[4] member id,
#   ARGV[5] ms until the Pacific day ends, then five per project: rpm, tpm, rpd (0 = no
#   limit), pacing interval ms, pacing burst ms
# Returns {index of the project admitted (1-based), 0} or {0, ms to wait} (-1: no project
# can ever take a request of this many tokens).
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, window, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, day_left = ARGV[4] .. '|' .. ARGV[3], tonumber(ARGV[5])
local best, best_pace, min_wait = 0, 0, -1
local function weight(m) return tonumber(string.match(m, '|(%d+)$')) end
for i = 1, n do
  local k, a = (i - 1) * 5, 5 + (i - 1) * 5
  local rate, tok, pace = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local day, backoff = KEYS[k + 4], KEYS[k + 5]
  local rpm, tpm, rpd = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local interval, burst = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local cutoff = now - window
  local expired = redis.call('ZRANGEBYSCORE', rate, '-inf', cutoff)
  if #expired > 0 then
    local freed = 0
    for _, m in ipairs(expired) do freed = freed + weight(m) end
    redis.call('DECRBY', tok, freed)
    redis.call('ZREMRANGEBYSCORE', rate, '-inf', cutoff)
  end
  local wait = redis.call('PTTL', backoff)
  if wait < 0 then wait = 0 end
  if wait == 0 and rpd > 0 and tonumber(redis.call('GET', day) or '0') >= rpd then
    wait = day_left
  end
  local count = redis.call('ZCARD', rate)
  if wait == 0 and rpm > 0 and count >= rpm then
    local oldest = redis.call('ZRANGE', rate, count - rpm, count - rpm, 'WITHSCORES')
    wait = tonumber(oldest[2]) + window - now + 1
  end
  if wait == 0 and tpm > 0 then
    local used = tonumber(redis.call('GET', tok) or '0')
    if tokens > tpm then
      wait = -1
    elseif used + tokens > tpm then
      local excess, freed = used + tokens - tpm, 0
      local entries = redis.call('ZRANGE', rate, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + weight(entries[j])
        if freed >= excess then
          wait = tonumber(entries[j + 1]) + window - now + 1
          break
        end
      end
    end
  end
  local due = tonumber(redis.call('GET', pace) or '0')
  if wait == 0 and interval > 0 and due - burst > now then wait = due - burst - now end
  if wait == 0 then
    if best == 0 or due < best_pace then best, best_pace = i, due end
  elseif wait > 0 and (min_wait < 0 or wait < min_wait) then
    min_wait = wait
  end
end
if best == 0 then return {0, min_wait} end
local k, a = (best - 1) * 5, 5 + (best - 1) * 5
local interval = tonumber(ARGV[a + 4])
redis.call('ZADD', KEYS[k + 1], now, member)
redis.call('INCRBY', KEYS[k + 2], tokens)
redis.call('PEXPIRE', KEYS[k + 1], window * 2)
redis.call('PEXPIRE', KEYS[k + 2], window * 2)
-- Without an RPM limit the pace is just the last admission: the next call goes elsewhere.
local due = math.max(best_pace, now) + interval
redis.call('SET', KEYS[k + 3], due, 'PX', due - now + window)
redis.call('INCR', KEYS[k + 4])
redis.call('EXPIRE', KEYS[k + 4], 172800)
return {best, 0}
"""

# Back off: make KEYS[1] exist for at least ARGV[1] ms (never shortens a longer back-off).
BACK_OFF_LUA = """
local wanted = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < wanted then
  redis.call('SET', KEYS[1], '1', 'PX', wanted)
end
return 1
"""


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Per (project, model); 0 means no limit."""

    rpm: int
    tpm: int
    rpd: int


@dataclass(frozen=True, slots=True)
class Project:
    name: str
    limits: QuotaLimits


class NeverFits(Exception):
    """The request needs more tokens than any project's TPM allows."""


def pacific_day(now: float | None = None) -> tuple[str, int]:
    """Today's Pacific date and the milliseconds left in it."""
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, PACIFIC)
    tomorrow = dt.datetime.combine(moment.date() + dt.timedelta(days=1), dt.time(), PACIFIC)
    return moment.date().isoformat(), max(1, int((tomorrow - moment).total_seconds() * 1000))


@dataclass
class QuotaGate:
    redis: Redis
    keys: Keys
    #: Whose quota: keys of each provider are counted apart (``{p}:{provider}:q:...``).
    provider: str
    window_s: float = 60.0
    margin_s: float = 1.0
    burst_s: float = 1.0
    _gates: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._admit = self.redis.register_script(ADMIT_LUA)
        self._back_off = self.redis.register_script(BACK_OFF_LUA)

    @property
    def _window_ms(self) -> int:
        return math.ceil((self.window_s + self.margin_s) * 1000)

    async def admit(
        self,
        model: str,
        projects: Sequence[Project],
        tokens: int,
        *,
        still_wanted: Callable[[], Awaitable[None]] | None = None,
    ) -> Project:
        """Wait until one of ``projects`` may send a request of ``tokens`` input tokens to
        ``model``; the request is counted against that project's quota from now.

        ``still_wanted`` is awaited before each try and may raise to give up waiting (the
        batch was paused meanwhile)."""
        gate = self._gates.setdefault(model, asyncio.Lock())
        started = time.monotonic()
        async with gate:
            while True:
                if still_wanted is not None:
                    await still_wanted()
                chosen, wait_ms = await self._try(model, projects, tokens)
                if chosen is not None:
                    QUOTA_WAIT_SECONDS.observe(time.monotonic() - started)
                    return chosen
                if wait_ms < 0:
                    raise NeverFits(f"{tokens} input tokens exceed every project's TPM")
                # At most a second at a time: a key quarantined or a new replica's
                # admissions are seen soon, and the wake-up is close to the free slot.
                await asyncio.sleep(min(wait_ms, 1000) / 1000)

    async def _try(
        self, model: str, projects: Sequence[Project], tokens: int
    ) -> tuple[Project | None, int]:
        day, day_left_ms = pacific_day()
        keys: list[str] = []
        args: list[int | str] = [
            len(projects),
            self._window_ms,
            tokens,
            secrets.token_hex(6),
            day_left_ms,
        ]
        for project in projects:
            base = self.keys.quota(self.provider, project.name, model)
            keys += [f"{base}:rate", f"{base}:tokens", f"{base}:pace", f"{base}:day:{day}"]
            keys.append(f"{base}:backoff")
            limits = project.limits
            interval = self._window_ms // limits.rpm if limits.rpm else 0
            args += [limits.rpm, limits.tpm, limits.rpd, interval, int(self.burst_s * 1000)]
        index, wait_ms = await self._admit(keys=keys, args=args)
        return (projects[int(index) - 1] if index else None), int(wait_ms)

    async def usage(self, project: str, model: str) -> dict[str, int]:
        """What one (project, model) used of its quota: requests and input tokens in the
        current window, requests today, and the milliseconds of back-off left."""
        base = self.keys.quota(self.provider, project, model)
        day, _ = pacific_day()
        seconds, micros = await self.redis.time()
        since = seconds * 1000 + micros // 1000 - self._window_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(f"{base}:rate", since, "+inf")
            pipe.get(f"{base}:tokens")
            pipe.get(f"{base}:day:{day}")
            pipe.pttl(f"{base}:backoff")
            requests, tokens, today, backoff = await pipe.execute()
        return {
            "rpm": int(requests),
            "tpm": int(tokens or 0),
            "rpd": int(today or 0),
            "backoff_ms": max(0, int(backoff)),
        }

    async def back_off(self, project: str, model: str, seconds: float) -> None:
        """No request to ``project`` and ``model`` for ``seconds`` (a 429's retry delay)."""
        key = f"{self.keys.quota(self.provider, project, model)}:backoff"
        await self._back_off(keys=[key], args=[max(1, math.ceil(seconds * 1000))])


class AdaptiveConcurrency:
    """How many Gemini requests this process keeps in flight.

    The target follows Little's law: the quota's request rate times the latency (an
    exponentially weighted mean), doubled for latency spread, plus a floor; so a slow
    model gets more requests in flight and a fast one fewer. An overload answer (503,
    504, timeout) halves the limit, which then stays down for ``cooldown_s`` before
    following the target again.
    """

    def __init__(self, *, rate_per_s: float, floor: int = 4, ceiling: int = 256) -> None:
        self.rate_per_s = rate_per_s
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.limit = self.ceiling
        self.inflight = 0
        self.latency_s: float | None = None
        self.cooldown_s = 5.0
        self._cooling_until = 0.0
        self._freed = asyncio.Event()
        CONCURRENCY_LIMIT.set(self.limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        while self.inflight >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._freed.set()

    def _set(self, limit: int) -> None:
        self.limit = max(self.floor, min(self.ceiling, limit))
        CONCURRENCY_LIMIT.set(self.limit)
        self._freed.set()

    def observe(self, latency_s: float) -> None:
        self.latency_s = (
            latency_s if self.latency_s is None else 0.8 * self.latency_s + 0.2 * latency_s
        )
        if time.monotonic() < self._cooling_until or self.rate_per_s <= 0:
            return
        self._set(math.ceil(2 * self.rate_per_s * self.latency_s) + self.floor)

    def overloaded(self) -> None:
        self._set(self.limit // 2)
        self._cooling_until = time.monotonic() + self.cooldown_s
