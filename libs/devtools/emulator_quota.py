"""Per-project rate-limit windows shared by the API emulators (Gemini, OpenAI, Anthropic).

Every provider meters requests per minute (RPM) and tokens per minute (TPM) per account
(Google: per Cloud project and model, https://ai.google.dev/gemini-api/docs/rate-limits;
OpenAI: per organization and model; Anthropic: per organization and model class), and Google
adds requests per day (RPD). The emulators keep one sliding window per (project, model) and
metric. No provider publishes its exact accounting; a sliding window gives the property the
emulators exist to test: the retry delay reported is the exact time until the window has
room for the refused request, so a client that waits that long (and is alone on the
project) gets through.

Requests refused with 429 are not counted, as they consume no quota. RPD uses a sliding
window of `day_seconds` rather than Google's reset at midnight Pacific time.

A rate limiter library (aiolimiter, limits) answers "may I proceed" but not "when exactly
will a slot free", which is what RetryInfo must carry, hence this small module.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Metric = Literal["rpm", "tpm", "rpd"]


@dataclass
class QuotaLimits:
    """Limits of one project (or one key, when the key belongs to no project). None: no limit."""

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None


@dataclass(frozen=True)
class Violation:
    metric: Metric
    limit: int
    retry_after: float


class SlidingWindow:
    """Weighted admissions within the last `length` seconds."""

    __slots__ = ("_entries", "_total", "length")

    def __init__(self, length: float) -> None:
        self.length = length
        self._entries: deque[tuple[float, int]] = deque()
        self._total = 0

    def _prune(self, now: float) -> None:
        horizon = now - self.length
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self._total -= entries.popleft()[1]

    def used(self, now: float) -> int:
        self._prune(now)
        return self._total

    def wait_for(self, now: float, weight: int, limit: int) -> float:
        """Seconds until `weight` more fits under `limit` (0: fits now; inf: never fits)."""
        self._prune(now)
        if self._total + weight <= limit:
            return 0.0
        if weight > limit:
            return math.inf
        excess = self._total + weight - limit
        freed = 0
        for stamp, amount in self._entries:
            freed += amount
            if freed >= excess:
                return max(0.0, stamp + self.length - now)
        return self.length  # unreachable: the whole window frees `_total` >= excess

    def next_release(self, now: float) -> float:
        """Seconds until the oldest admission leaves the window (0: the window is empty)."""
        self._prune(now)
        if not self._entries:
            return 0.0
        return max(0.0, self._entries[0][0] + self.length - now)

    def add(self, now: float, weight: int) -> None:
        self._prune(now)
        self._entries.append((now, weight))
        self._total += weight


@dataclass
class _Bucket:
    minute_requests: SlidingWindow
    minute_tokens: SlidingWindow
    day_requests: SlidingWindow


@dataclass
class QuotaBook:
    """All quota windows of the emulator, keyed by (project, model)."""

    window_seconds: float = 60.0
    day_seconds: float = 86_400.0
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def _bucket(self, scope: tuple[str, str]) -> _Bucket:
        bucket = self._buckets.get(scope)
        if bucket is None:
            bucket = _Bucket(
                SlidingWindow(self.window_seconds),
                SlidingWindow(self.window_seconds),
                SlidingWindow(self.day_seconds),
            )
            self._buckets[scope] = bucket
        return bucket

    def check(
        self, scope: tuple[str, str], limits: QuotaLimits, tokens: int, now: float
    ) -> list[Violation]:
        """The limits that admitting this request now would break (empty: it may proceed)."""
        bucket = self._bucket(scope)
        out: list[Violation] = []
        checks: tuple[tuple[Metric, int | None, SlidingWindow, int], ...] = (
            ("rpm", limits.rpm, bucket.minute_requests, 1),
            ("tpm", limits.tpm, bucket.minute_tokens, tokens),
            ("rpd", limits.rpd, bucket.day_requests, 1),
        )
        for metric, limit, window, weight in checks:
            if limit is None:
                continue
            wait = window.wait_for(now, weight, limit)
            if wait > 0:
                out.append(Violation(metric, limit, wait))
        return out

    def admit(self, scope: tuple[str, str], tokens: int, now: float) -> None:
        bucket = self._bucket(scope)
        bucket.minute_requests.add(now, 1)
        bucket.minute_tokens.add(now, tokens)
        bucket.day_requests.add(now, 1)

    def window_state(
        self, scope: tuple[str, str], metric: Literal["requests", "tokens"], now: float
    ) -> tuple[int, float]:
        """(used in the minute window, seconds until its oldest admission leaves it)."""
        bucket = self._bucket(scope)
        window = bucket.minute_requests if metric == "requests" else bucket.minute_tokens
        return window.used(now), window.next_release(now)

    def usage(self, now: float) -> dict[str, dict[str, int]]:
        """Current window contents per "project/model", for the stats endpoint."""
        return {
            f"{project}/{model}": {
                "requests_in_window": b.minute_requests.used(now),
                "tokens_in_window": b.minute_tokens.used(now),
                "requests_in_day": b.day_requests.used(now),
            }
            for (project, model), b in self._buckets.items()
        }

    def clear(self) -> None:
        self._buckets.clear()
