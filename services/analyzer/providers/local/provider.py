"""The ``local`` provider: offline analysis on this machine (no key, no cost).

``facts`` runs in a thread pool (Pillow and numpy release the GIL for the heavy parts, a
few ms per image). ``content`` runs in ``content.ModelPool``'s processes, each holding the
OCR and NSFW models once: between the model runs, OCR's pre- and post-processing (numpy,
OpenCV, polygon clipping, box sorting, CTC decoding) is Python code that threads would
take turns at under the GIL, about a second of CPU per image.
"""

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
from imagestream.common.settings import SettingsError

from ..base import Analysis
from . import CONTENT, LocalSettings, profile_of
from . import content as models
from . import facts as local

#: Bump when an analysis gives other answers for the same image (the cache keys on it).
LOCAL_VERSION = "local@1"
CONTENT_VERSION = "local-content@1"


@dataclass
class LocalProvider:
    """Offline analysis computed on this machine."""

    config: LocalSettings
    name: str = "local"
    paid: bool = False
    jobs: None = None
    _pool: ThreadPoolExecutor = field(init=False)
    _models: models.ModelPool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        cores = os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.analyze_threads or cores, thread_name_prefix="analyze"
        )
        if self.config.local_models:
            self._models = models.ModelPool(
                self.config.local_model_workers or cores,
                self.config.local_model_threads,
                self.config.local_nsfw_threshold,
            )

    async def start(self) -> None:
        if self._models is None:
            return
        try:
            await self._models.start()
        except models.ModelError as exc:
            raise SettingsError(
                f"{exc} (reinstall the package, or set LOCAL_MODELS=false to serve facts only)"
            ) from None

    def columns(self, config: BatchConfig) -> list[str]:
        return list(self.schema(config))

    def schema(self, config: BatchConfig) -> dict[str, dict[str, Any]]:
        if profile_of(config.profile) == CONTENT:
            return local.SCHEMA | models.SCHEMA
        return dict(local.SCHEMA)

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        if profile_of(config.profile) == CONTENT:
            # Text read depends on the analysis image's size, nsfw on the threshold.
            side = config.options.get("long_side", "default")
            return f"{CONTENT_VERSION}:{side}:{self.config.local_nsfw_threshold}", ""
        return LOCAL_VERSION, ""

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis:
        try:
            if profile_of(config.profile) == CONTENT:
                fields = await self._content(data, facts)
            else:
                loop = asyncio.get_running_loop()
                fields = await loop.run_in_executor(self._pool, partial(local.analyze, data, facts))
        except OSError as exc:  # Pillow: unreadable image data
            raise ItemError(ErrorClass.DECODE_ERROR, f"cannot decode the image: {exc}") from None
        return Analysis(fields=fields)

    async def _content(self, data: bytes, facts: ImageFacts) -> dict[str, Any]:
        if self._models is None:
            raise ItemError(
                ErrorClass.ANALYZER_ERROR,
                "this analyzer does not load the content models (LOCAL_MODELS=false)",
            )
        try:
            return await self._models.analyze(data, facts)
        except models.ModelError as exc:
            raise ItemError(ErrorClass.ANALYZER_ERROR, str(exc)) from None

    async def report(self, stop: asyncio.Event) -> None:
        return  # nothing to publish: no keys, no quota

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._models is not None:
            await self._models.close()
