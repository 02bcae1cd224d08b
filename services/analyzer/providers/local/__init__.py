"""The ``local`` provider: offline, keyless, deterministic facts about an image.

``SPEC`` is what the registry (``imagestream.common.providers``) loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from imagestream.common import profiles, settings
from imagestream.common.providers import Check, EstimateRequest, ProviderEstimate


class LocalSettings(msgspec.Struct, kw_only=True, frozen=True):
    #: Threads for the local analyzer (0 = one per core).
    analyze_threads: int = 0


class LocalSpec:
    name = "local"
    title = "Local (offline, free)"
    paid = False
    modes = ("standard",)
    keyed = False

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        if profile or model:
            raise profiles.ProfileError("the local analyzer takes no profile or model")
        return None, None

    def missing(self, env: Mapping[str, str]) -> str | None:
        return None

    def load_settings(self, env: Mapping[str, str]) -> LocalSettings:
        return settings.load(LocalSettings, env)

    def concurrency(self, config: Any) -> int:
        return 8

    def create(self, res: Any, config: LocalSettings) -> Any:
        from .provider import LocalProvider

        return LocalProvider(threads=config.analyze_threads)

    async def doctor(self, env: Mapping[str, str]) -> list[Check]:
        return []  # nothing to check: no key, no server

    async def estimate(self, env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
        raise profiles.ProfileError("the local analyzer costs nothing: no estimate to make")


SPEC = LocalSpec()
