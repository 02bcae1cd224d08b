"""Politeness: how hard the fetcher may hit one host, and what a host lets it do.

``HostGates`` admits requests to a host: at most ``per_host`` at once, and none while the
host is cooling down after it answered 429 or 503 (for its Retry-After, or an exponential
backoff when it gave none). A request waiting at a host's gate holds no download slot
(the downloader takes its global slot after the gate), so the other hosts keep the
connections busy; and a cooldown longer than ``max_wait_s`` fails the request at once as
``rate_limited`` (transient: the item can be replayed) instead of parking the item for
minutes. Written here rather than taken from a limiter library because what it needs is
a per-key semaphore plus a per-key "not before" time set by the server's answers, which
the token-bucket limiters (aiolimiter, pyrate-limiter) do not model.

``opts_out`` reads ``X-Robots-Tag`` the way search engines document it: comma-separated
directives, each header (or each run after a ``name:`` prefix) optionally scoped to one
user agent (``imagestream: noai`` applies to us, ``otherbot: noai`` does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter

from imagestream.common.errors import ErrorClass, ItemError

HOST_BACKOFFS = Counter(
    "imagestream_fetch_host_backoffs_total",
    "Times a host answered 429/503 and the fetcher paused requests to it.",
)

#: Longest cooldown kept for a host (a Retry-After of a year is taken as a day).
_MAX_COOLDOWN_S = 86_400.0
#: Directives that take a value after a colon, so "name:" before them is no user agent.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def opts_out(header_values: Iterable[str], agent: str) -> str | None:
    """The ``X-Robots-Tag`` directive that forbids AI use to user agent ``agent``, if any.

    ``noai`` / ``noimageai`` count when unscoped or scoped to ``agent``
    (case-insensitive); a scope runs from its ``name:`` to the end of the header value
    or to the next scope.
    """
    agent = agent.lower()
    for value in header_values:
        scope: str | None = None
        for part in value.split(","):
            directive = part.strip().lower()
            name, colon, rest = directive.partition(":")
            if colon and name.strip() not in _VALUED_DIRECTIVES:
                scope, directive = name.strip(), rest.strip()
            if directive in OPT_OUT_DIRECTIVES and scope in (None, agent):
                return part.strip()
    return None


@dataclass
class _Host:
    slots: asyncio.Semaphore
    not_before: float = 0.0  # loop time before which no request starts
    strikes: int = 0  # consecutive 429/503 answers
    users: int = 0  # requests waiting at or holding the gate


@dataclass
class HostGates:
    per_host: int
    #: Longest cooldown a request waits out; beyond it the request fails as rate_limited.
    max_wait_s: float
    #: Cooldown after a 429/503 without Retry-After, doubled on each further one.
    base_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    _hosts: dict[str, _Host] = field(default_factory=dict)
    _sweep_at: int = 1024

    @contextlib.asynccontextmanager
    async def admit(self, host: str) -> AsyncIterator[None]:
        state = self._hosts.get(host)
        if state is None:
            self._forget_cooled_hosts()
            state = self._hosts[host] = _Host(asyncio.Semaphore(self.per_host))
        state.users += 1
        try:
            await self._acquire(host, state)
            try:
                yield
            finally:
                state.slots.release()
        finally:
            state.users -= 1
            if state.users == 0 and state.not_before <= _now():
                del self._hosts[host]  # idle hosts cost nothing, whatever their number

    def _forget_cooled_hosts(self) -> None:
        # Unused hosts are dropped on release unless cooling down; those are swept here,
        # when the table has doubled since the last sweep (amortised O(1) per host).
        if len(self._hosts) < self._sweep_at:
            return
        now = _now()
        for host in [h for h, s in self._hosts.items() if s.users == 0 and s.not_before <= now]:
            del self._hosts[host]
        self._sweep_at = max(1024, 2 * len(self._hosts))

    async def _acquire(self, host: str, state: _Host) -> None:
        while True:
            wait = state.not_before - _now()
            if wait > self.max_wait_s:
                raise ItemError(
                    ErrorClass.RATE_LIMITED,
                    f"{host} asked for a {wait:.0f} s pause (429/503)",
                    retry_after_s=wait,
                )
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await state.slots.acquire()
            if state.not_before <= _now():
                return
            state.slots.release()  # the host started cooling down while we queued

    def back_off(self, host: str, retry_after: float | None) -> None:
        """The host answered 429/503: no request to it starts for a while."""
        state = self._hosts.get(host)
        if state is None:
            return
        HOST_BACKOFFS.inc()
        state.strikes += 1
        pause = (
            retry_after
            if retry_after is not None
            else self.base_backoff_s * 2 ** min(state.strikes - 1, 16)
        )
        pause = min(pause, _MAX_COOLDOWN_S if retry_after is not None else self.max_backoff_s)
        state.not_before = max(state.not_before, _now() + pause)

    def served(self, host: str) -> None:
        """The host answered normally: its backoff starts over from the base."""
        state = self._hosts.get(host)
        if state is not None:
            state.strikes = 0

    def cooling_down(self, host: str) -> float:
        """Seconds until requests to ``host`` may start again (0 when they may now)."""
        state = self._hosts.get(host)
        return max(0.0, state.not_before - _now()) if state is not None else 0.0


def _now() -> float:
    return time.monotonic()
