"""Process lifecycle: uvloop, signals and the one shutdown pattern every service uses.

SIGTERM/SIGINT set a stop event: services stop reading new work, wait for what is in
flight up to ``SHUTDOWN_GRACE_S`` (shorter than Kubernetes' termination grace), then
cancel. Work that did not finish stays unacknowledged in its stream, where another
consumer claims it. A second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import uvloop
from prometheus_client import Gauge
from redis.asyncio import Redis
from redis.exceptions import LockError, RedisError

log = logging.getLogger(__name__)


def install_stop_signals(stop: asyncio.Event, main_task: asyncio.Task[Any]) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: cancelling now", extra={"signal": signum})
            main_task.cancel()
            return
        log.info("stopping: finishing in-flight work", extra={"signal": signum})
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(stop)`` on uvloop until it returns; signals set ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None
        install_stop_signals(stop, task)
        await main(stop)

    uvloop.run(runner())


async def drain(tasks: set[asyncio.Task[Any]], grace_s: float) -> None:
    """Wait up to ``grace_s`` for ``tasks``, then cancel what is left and wait for it."""
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def supervise(
    name: str, func: Callable[[], Awaitable[object]], stop: asyncio.Event, every_s: float
) -> None:
    """Run a background chore every ``every_s`` until ``stop``; log failures and keep going."""
    while not stop.is_set():
        try:
            await func()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task failed; retrying", extra={"task": name})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


class Lease:
    """A short Redis lock held from tick to tick, so one process of the deployment does a
    chore; ``leader`` (a gauge) shows which. Losing Redis or the lock just means not
    leading; a lease that cannot be released expires on its own."""

    def __init__(self, redis: Redis, key: str, timeout_s: float, leader: Gauge) -> None:
        self._lock = redis.lock(key, timeout=timeout_s, blocking=False)
        self._leader = leader
        self.leading = False

    async def hold(self) -> bool:
        """Take the lease, or keep it for another ``timeout_s``; whether this process leads."""
        try:
            if self.leading:
                await self._lock.reacquire()
            else:
                self.leading = bool(await self._lock.acquire(blocking=False))
        except (LockError, RedisError, OSError):
            self.leading = False
        self._leader.set(1 if self.leading else 0)
        return self.leading

    async def release(self) -> None:
        self._leader.set(0)
        if self.leading:
            self.leading = False
            with contextlib.suppress(LockError, RedisError, OSError):
                await self._lock.release()
