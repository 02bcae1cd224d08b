"""The ``ProviderSpec`` of a keyed model provider, written once.

A spec is what the api, the CLI and the analyzer load for every provider, so it stays
light: this module imports only the standard library and ``imagestream.common``; the
provider's own modules (and its SDK with them) are imported by name when a hook needs
them. The package of a provider that uses it holds ``provider.py`` (its settings struct
and its ``keyed.KeyedProvider``, named by ``settings_type`` and ``provider_type``),
``batch.py`` (``batch_jobs(provider)``, when ``modes`` has ``batch``), ``doctor.py``
(``async check_keys(env)``) and ``estimate.py`` (``async estimate(env, request)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from imagestream.common import settings
from imagestream.common.providers import Check, EstimateRequest, ProviderEstimate


class KeyedSpec:
    name: str
    title: str
    #: Class names in the package's ``provider.py``.
    settings_type: str
    provider_type: str
    paid = True
    modes: tuple[str, ...] = ("standard", "batch")
    keyed = True

    def _module(self, name: str) -> ModuleType:
        """A module of the provider's package (the one that defines the spec's class)."""
        return importlib.import_module(f"{type(self).__module__}.{name}")

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        choice = self.load_settings(env).choose(profile, model)
        return choice.compiled.name, choice.model

    def long_side(self, profile: str | None) -> int | None:
        return None  # the image a model sees is sized by ANALYSIS_LONG_SIDE

    def missing(self, env: Mapping[str, str]) -> str | None:
        variable = f"{self.name.upper()}_API_KEYS"
        return None if env.get(variable, "").strip() else f"set {variable}"

    def load_settings(self, env: Mapping[str, str]) -> Any:
        return settings.load(getattr(self._module("provider"), self.settings_type), env)

    def concurrency(self, config: Any) -> int:
        provider_type = getattr(self._module("provider"), self.provider_type)
        return int(provider_type.wanted_concurrency(config))

    def create(self, res: Any, config: Any) -> Any:
        if not config.keyed().api_keys:
            return None
        provider = getattr(self._module("provider"), self.provider_type)(res, config)
        if "batch" in self.modes:
            provider.jobs = self._module("batch").batch_jobs(provider)
        return provider

    async def doctor(self, env: Mapping[str, str]) -> list[Check]:
        rows: list[Check] = await self._module("doctor").check_keys(env)
        return rows

    async def estimate(self, env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
        found: ProviderEstimate = await self._module("estimate").estimate(env, request)
        return found
