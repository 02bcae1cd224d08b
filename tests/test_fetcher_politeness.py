"""Politeness over real HTTP on loopback: the per-host limit, backing off a host that
answers 429/503 (honouring Retry-After) while other hosts keep going, and the opt-out
switch. Two servers on different ports of 127.0.0.2 are two hosts (the gate is per
host:port)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from imagestream.common.errors import ErrorClass, ItemError
from imagestream.fetcher import image
from imagestream.fetcher.http import Downloader
from imagestream.fetcher.politeness import HostGates
from imagestream.fetcher.settings import FetcherSettings

from .fetcher_servers import RawServer, delayed, reply

BODY = b"\xff\xd8\xff\xe0" + bytes(2000)  # passes the early check; never decoded here


def downloader(**overrides: object) -> Downloader:
    settings = FetcherSettings(
        fetch_allowed_cidrs=("127.0.0.2/32",),
        fetch_backoff_s=0.05,
        **overrides,  # type: ignore[arg-type]
    )
    return Downloader(settings, check_head=image.check_head, head_bytes=image.SNIFF_BYTES)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[RawServer, RawServer]]:
    a = await RawServer(
        {
            "slow": delayed(reply(BODY), 0.2),
            "busy": [reply(b"", status=429, headers={"Retry-After": "2"}), reply(BODY)],
            "away": [reply(b"", status=503, headers={"Retry-After": "3600"}), reply(BODY)],
            "noai": reply(BODY, headers={"X-Robots-Tag": "noai"}),
        }
    ).start()
    b = await RawServer({"quick": delayed(reply(BODY), 0.02)}).start()
    yield a, b
    await a.stop()
    await b.stop()


async def test_at_most_per_host_requests_at_once(servers: tuple[RawServer, RawServer]) -> None:
    a, _ = servers
    fetcher = downloader(fetch_per_host=2, fetch_concurrency=16)
    try:
        results = await asyncio.gather(*(fetcher.fetch(a.url("slow")) for _ in range(8)))
    finally:
        await fetcher.close()
    assert all(r.body == BODY for r in results)
    assert a.hits["slow"] == 8
    assert a.max_active == 2


async def test_a_rate_limited_host_waits_and_the_others_go_on(
    servers: tuple[RawServer, RawServer],
) -> None:
    a, b = servers
    # Two download slots in all: if the items waiting for host a held one, b would stall.
    fetcher = downloader(fetch_per_host=2, fetch_concurrency=2, fetch_attempts=3)
    try:
        first = asyncio.create_task(fetcher.fetch(a.url("busy")))
        while a.hits["busy"] < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the 429 has been read
        more_a = [asyncio.create_task(fetcher.fetch(a.url("busy"))) for _ in range(4)]
        results_b = await asyncio.gather(*(fetcher.fetch(b.url("quick")) for _ in range(10)))
        results_a = await asyncio.gather(first, *more_a)
    finally:
        await fetcher.close()
    assert all(r.body == BODY for r in [*results_a, *results_b])
    (_, answered_429), *after = a.log
    resumed = min(t for _, t in after)
    # Retry-After: 2 was honoured by every request to a, the retried one and the new ones.
    assert len(after) == 5
    assert resumed - answered_429 >= 1.9
    # ... and host b was served meanwhile, all ten requests before a resumed.
    assert len(b.log) == 10
    assert all(answered_429 < t < resumed for _, t in b.log)


async def test_a_retry_after_beyond_the_wait_limit_fails_fast(
    servers: tuple[RawServer, RawServer],
) -> None:
    a, b = servers
    fetcher = downloader(fetch_max_host_wait_s=30, fetch_attempts=3)
    try:
        with pytest.raises(ItemError) as first:
            await fetcher.fetch(a.url("away"))
        with pytest.raises(ItemError) as second:
            await fetcher.fetch(a.url("away"))
        assert (await fetcher.fetch(b.url("quick"))).body == BODY
    finally:
        await fetcher.close()
    assert first.value.error_class is ErrorClass.HTTP_SERVER_ERROR  # the 503, not retried
    assert second.value.error_class is ErrorClass.RATE_LIMITED  # refused without a request
    assert second.value.message.endswith("pause (429/503)")
    assert a.hits["away"] == 1


async def test_the_opt_out_can_be_switched_off(servers: tuple[RawServer, RawServer]) -> None:
    a, _ = servers
    polite, blunt = downloader(), downloader(fetch_respect_noai=False)
    try:
        with pytest.raises(ItemError) as skipped:
            await polite.fetch(a.url("noai"))
        assert (await blunt.fetch(a.url("noai"))).body == BODY
    finally:
        await polite.close()
        await blunt.close()
    assert skipped.value.error_class is ErrorClass.OPTED_OUT


async def test_backoff_without_retry_after_doubles_and_resets() -> None:
    gates = HostGates(per_host=1, max_wait_s=60, base_backoff_s=10)
    async with gates.admit("h:80"):
        gates.back_off("h:80", None)
        assert 9 < gates.cooling_down("h:80") <= 10
        gates.back_off("h:80", None)
        assert 19 < gates.cooling_down("h:80") <= 20
        gates.back_off("h:80", 45.0)  # Retry-After given: taken as is, never shortened
        assert 44 < gates.cooling_down("h:80") <= 45
        gates.served("h:80")
        gates.back_off("h:80", None)  # the streak started over, the pause still runs
        assert 44 < gates.cooling_down("h:80") <= 45
    assert gates.cooling_down("other:80") == 0
