"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll an async predicate until it returns something truthy.

    Bounded, and never a timing assertion: the timeout only stops a test that hangs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: last value {value!r}")
        await asyncio.sleep(interval)


async def wait_ready(base_url: str, timeout: float = 60.0) -> None:
    """Wait until a service started by the test answers 200 on /readyz."""

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{base_url}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=timeout)
