"""The analysis cache: identical content is analyzed once, whatever the batch or replica.

An analysis is stored in PostgreSQL (``analysis_cache``) under (content sha256, analyzer,
profile key, model), so re-running a batch or meeting a duplicate image costs nothing; a
hit is a result marked ``cache_hit`` with zero tokens. Blocked answers are cached too (the
same image meets the same refusal); failures are not.

Duplicates that arrive at the same moment (twenty copies of a picture in one list) are
single-flighted across replicas: the first takes a short lease in Redis
(``flight:{analyzer}:{profile}:{model}:{sha256}``, renewed while it works) and analyzes;
the others poll the lease (Redis only, backing off to half a second) and, once it is gone,
read the cache row it left. If the holder failed or died, the next waiter takes the lease
and tries itself.

A batch with ``options.cache = false`` neither reads the cache nor waits for others; its
fresh analyses replace the cached ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from imagestream.common.connections import Resources
from imagestream.common.messages import Usage

log = logging.getLogger(__name__)

CACHE_LOOKUPS = Counter(
    "imagestream_analysis_cache_total",
    "Analysis cache lookups by outcome: hit, shared (waited for a duplicate being analyzed),"
    " miss, bypass.",
    ["outcome"],
)

# Extend or remove the lease only while this holder owns it. KEYS[1] lease; ARGV[1] token,
# ARGV[2] new TTL ms (0 = release).
LEASE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


@dataclass(frozen=True, slots=True)
class ContentKey:
    sha256: str
    analyzer: str
    profile_key: str
    model: str


class AnalysisCache:
    def __init__(self, res: Resources, *, lease_s: float = 30.0, poll_s: float = 0.05) -> None:
        self.res = res
        self.lease_ms = int(lease_s * 1000)
        self.poll_s = poll_s
        self._lease = res.redis.register_script(LEASE_LUA)

    async def get(self, key: ContentKey) -> dict[str, Any] | None:
        analysis: dict[str, Any] | None = await self.res.pool.fetchval(
            """
            SELECT analysis FROM analysis_cache
            WHERE sha256 = $1 AND analyzer = $2 AND profile_key = $3 AND model = $4
            """,
            bytes.fromhex(key.sha256),
            key.analyzer,
            key.profile_key,
            key.model,
        )
        return analysis

    async def put(self, key: ContentKey, analysis: dict[str, Any], usage: Usage | None) -> None:
        await self.res.pool.execute(
            """
            INSERT INTO analysis_cache (sha256, analyzer, profile_key, model, analysis,
                                        input_tokens, output_tokens)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (sha256, analyzer, profile_key, model) DO UPDATE
            SET analysis = EXCLUDED.analysis, input_tokens = EXCLUDED.input_tokens,
                output_tokens = EXCLUDED.output_tokens, created_at = now()
            """,
            bytes.fromhex(key.sha256),
            key.analyzer,
            key.profile_key,
            key.model,
            analysis,
            usage.input_tokens if usage else 0,
            usage.output_tokens if usage else 0,
        )

    @contextlib.asynccontextmanager
    async def claim(self, key: ContentKey) -> AsyncIterator[dict[str, Any] | None]:
        """Yields the analysis of this content if another consumer produced it meanwhile;
        else None, and the caller analyzes (and ``put``s) while holding the lease."""
        lease = self.res.keys.flight(key.analyzer, key.profile_key, key.model, key.sha256)
        token = secrets.token_hex(8)
        delay = self.poll_s
        while not await self.res.redis.set(lease, token, nx=True, px=self.lease_ms):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            if not await self.res.redis.exists(lease):
                found = await self.get(key)
                if found is not None:
                    CACHE_LOOKUPS.labels("shared").inc()
                    yield found
                    return
        renewer = asyncio.create_task(self._renew(lease, token))
        try:
            # The holder before us may have finished between our lookup and our lease.
            found = await self.get(key)
            if found is not None:
                CACHE_LOOKUPS.labels("shared").inc()
            yield found
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            await self._lease(keys=[lease], args=[token, 0])

    async def _renew(self, lease: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self._lease(keys=[lease], args=[token, self.lease_ms])
            except Exception as exc:  # the lease lapses; a waiter takes over, no harm done
                log.warning("could not renew an analysis lease: %s", exc)
