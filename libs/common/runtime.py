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
