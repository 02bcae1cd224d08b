"""The ``local`` provider: offline image facts computed on this machine (no key, no cost)."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.messages import ImageFacts

from ..base import Analysis
from . import facts as local

#: Bump when local.analyze gives other answers for the same image.
LOCAL_VERSION = "local@1"


@dataclass
class LocalProvider:
    """Offline image facts computed on this machine (no key, no cost)."""

    name: str = "local"
    paid: bool = False
    jobs: None = None
    threads: int = 0
    _pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self.threads or os.cpu_count() or 2, thread_name_prefix="analyze"
        )

    def columns(self, config: BatchConfig) -> list[str]:
        return list(local.COLUMNS)

    def schema(self, config: BatchConfig) -> dict[str, dict[str, Any]]:
        return dict(local.SCHEMA)

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        return LOCAL_VERSION, ""

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis:
        loop = asyncio.get_running_loop()
        try:
            fields = await loop.run_in_executor(self._pool, partial(local.analyze, data, facts))
        except OSError as exc:  # Pillow: unreadable image data
            raise ItemError(ErrorClass.DECODE_ERROR, f"cannot decode the image: {exc}") from None
        return Analysis(fields=fields)

    async def report(self, stop: asyncio.Event) -> None:
        return  # nothing to publish: no keys, no quota

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
