"""Service processes for tests: the devtools helpers with settings that make recovery fast."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from imagestream.devtools import processes
from imagestream.devtools.processes import Fleet, RedisServer, Service, free_port

__all__ = [
    "Fleet",
    "RedisServer",
    "Service",
    "free_port",
    "pool_workers_outliving",
    "service_env",
]

#: Short blocking reads, claim times and retry delays: tests see recovery in seconds.
TEST_SETTINGS = {
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "METRICS_PORT": "0",
    "READ_BLOCK_MS": "300",
    "CLAIM_IDLE_MS": "5000",
    "CLAIM_INTERVAL_S": "1",
    "DISPATCH_INTERVAL_S": "0.05",
    "RECONCILE_INTERVAL_S": "0.5",
    "FETCH_ATTEMPTS": "2",
    "FETCH_BACKOFF_S": "0.05",
    "SHUTDOWN_GRACE_S": "5",
    # The content profile's model workers (seconds of start, ~250 MB each) only where a
    # test asks for them.
    "LOCAL_MODELS": "false",
}


def service_env(redis_url: str, database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return processes.service_env(redis_url, database_url, prefix, **{**TEST_SETTINGS, **extra})


async def pool_workers_outliving(script: str, *, least: int) -> list[int]:
    """Run ``script`` (it prints ``ready`` once its process pool's workers run), SIGKILL it,
    and return the pids of its pool workers that are still alive 30 s later."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=240)
        assert line == b"ready\n"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(pid) for pid in children if b"spawn_main" in _cmdline(int(pid))]
        assert len(workers) >= least, children
    finally:
        proc.kill()
        # Workers that live on keep the script's stdout open, and asyncio's wait() waits for
        # that pipe too: bounded, so a failure shows as a timeout instead of a hang.
        await asyncio.wait_for(proc.wait(), timeout=60)
    for _ in range(150):
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        if not alive:
            break
        await asyncio.sleep(0.2)
    return alive


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
