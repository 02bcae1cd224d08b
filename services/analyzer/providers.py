"""The analyzer's providers: one interface, several engines (local, gemini...)."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.messages import ImageFacts, Usage

from . import local


@dataclass(frozen=True, slots=True)
class Analysis:
    fields: dict[str, Any]
    usage: Usage | None = None
    model: str | None = None


class Provider(Protocol):
    name: str

    def columns(self, config: BatchConfig) -> list[str]:
        """The analysis fields this provider returns for the batch, in export order."""
        ...

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis: ...

    async def close(self) -> None: ...


@dataclass
class LocalProvider:
    """Offline image facts computed on this machine (no key, no cost)."""

    name: str = "local"
    threads: int = 0
    _pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self.threads or os.cpu_count() or 2, thread_name_prefix="analyze"
        )

    def columns(self, config: BatchConfig) -> list[str]:
        return list(local.COLUMNS)

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis:
        loop = asyncio.get_running_loop()
        try:
            fields = await loop.run_in_executor(self._pool, partial(local.analyze, data, facts))
        except OSError as exc:  # Pillow: unreadable image data
            raise ItemError(ErrorClass.DECODE_ERROR, f"cannot decode the image: {exc}") from None
        return Analysis(fields=fields)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
