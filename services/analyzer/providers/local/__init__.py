"""The ``local`` provider: offline, keyless analysis on this machine, in two profiles:

* ``facts`` (the default): deterministic pixel facts (facts.py), milliseconds per image;
* ``content``: the facts plus text (OCR) and NSFW detection by ONNX models shipped in
  their wheels (content.py), about a second of CPU per image.

``SPEC`` is what the registry (``imagestream.common.providers``) loads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from imagestream.common import profiles, settings
from imagestream.common.providers import Check, EstimateRequest, ProviderEstimate

FACTS, CONTENT = "facts", "content"
PROFILES: Final = (FACTS, CONTENT)
#: Chosen by measurement (README, bench/RESULTS.md): ``content`` costs ~100x the CPU of
#: ``facts``, so it is what a batch asks for, not what every batch pays.
DEFAULT_PROFILE: Final = FACTS
#: The analysis image's long side for ``content`` when a batch names none: OCR needs more
#: pixels than colour statistics (bench/ocr_long_side.py; the figures are in the README).
CONTENT_LONG_SIDE: Final = 1280


class LocalSettings(msgspec.Struct, kw_only=True, frozen=True):
    #: Threads computing the ``facts`` profile (0 = one per core).
    analyze_threads: int = 0
    #: Load the ``content`` profile's models at start (false: this analyzer serves
    #: ``facts`` only, and its ``content`` items fail with analyzer_error).
    local_models: bool = True
    #: Processes running the content models (0 = one per core); each holds its own copy.
    local_model_workers: int = 0
    #: onnxruntime threads per model session in each of those processes.
    local_model_threads: int = 1
    #: ``nsfw`` is true when an exposed intimate part scores at least this (0-1).
    local_nsfw_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.analyze_threads < 0 or self.local_model_workers < 0:
            raise ValueError("ANALYZE_THREADS and LOCAL_MODEL_WORKERS must be 0 or more")
        if self.local_model_threads < 1:
            raise ValueError("LOCAL_MODEL_THREADS must be 1 or more")
        if not 0.0 < self.local_nsfw_threshold <= 1.0:
            raise ValueError("LOCAL_NSFW_THRESHOLD must be more than 0 and at most 1")


def profile_of(profile: str | None) -> str:
    """A batch's local profile (batches from before profiles have none: ``facts``)."""
    return profile or FACTS


class LocalSpec:
    name = "local"
    title = "Local (offline, free)"
    paid = False
    modes = ("standard",)
    keyed = False

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        if model:
            raise profiles.ProfileError("the local analyzer takes no model")
        chosen = profile or DEFAULT_PROFILE
        if chosen not in PROFILES:
            raise profiles.ProfileError(f"local profile must be one of {', '.join(PROFILES)}")
        return chosen, None

    def long_side(self, profile: str | None) -> int | None:
        return CONTENT_LONG_SIDE if profile == CONTENT else None

    def missing(self, env: Mapping[str, str]) -> str | None:
        return None

    def load_settings(self, env: Mapping[str, str]) -> LocalSettings:
        return settings.load(LocalSettings, env)

    def concurrency(self, config: Any) -> int:
        return 8

    def create(self, res: Any, config: LocalSettings) -> Any:
        from .provider import LocalProvider

        return LocalProvider(config)

    async def doctor(self, env: Mapping[str, str]) -> list[Check]:
        """A row per model file of the ``content`` profile: present and loadable."""
        from .content import ModelError, check_model, model_files

        config = self.load_settings(env)
        try:
            files = model_files()
        except ModelError as exc:
            return [Check("local models", "fail", str(exc))]
        rows = []
        for model in files:
            name = f"local model: {model.name}"
            if not config.local_models:
                rows.append(Check(name, "skip", "LOCAL_MODELS=false", required=False))
                continue
            try:
                rows.append(Check(name, "ok", await asyncio.to_thread(check_model, model)))
            except ModelError as exc:
                rows.append(Check(name, "fail", str(exc)))
        return rows

    async def estimate(self, env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
        raise profiles.ProfileError("the local analyzer costs nothing: no estimate to make")


SPEC = LocalSpec()
