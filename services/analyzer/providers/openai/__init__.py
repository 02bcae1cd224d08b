"""The ``openai`` provider: OpenAI-compatible chat completions (OpenAI, OpenRouter, vLLM,
Ollama, LM Studio, TGI) through the official ``openai`` SDK.

``SPEC`` is what the registry (``imagestream.common.providers``) loads; it imports the SDK
only when an analyzer, ``doctor`` or ``estimate`` asks for the real thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagestream.common.providers import Check, EstimateRequest, ProviderEstimate


class OpenAISpec:
    name = "openai"
    title = "OpenAI-compatible (OpenAI, vLLM, Ollama...)"
    paid = True
    modes = ("standard", "batch")
    keyed = True

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        from .provider import settings_from

        choice = settings_from(env).choose(profile, model)
        return choice.compiled.name, choice.model

    def missing(self, env: Mapping[str, str]) -> str | None:
        return None if env.get("OPENAI_API_KEYS", "").strip() else "set OPENAI_API_KEYS"

    def load_settings(self, env: Mapping[str, str]) -> Any:
        from .provider import settings_from

        return settings_from(env)

    def concurrency(self, config: Any) -> int:
        from .provider import OpenAIProvider

        return OpenAIProvider.wanted_concurrency(config)

    def create(self, res: Any, config: Any) -> Any:
        from .batch import batch_jobs
        from .provider import OpenAIProvider

        if not config.openai_api_keys:
            return None
        provider = OpenAIProvider(res, config)
        provider.jobs = batch_jobs(provider)
        return provider

    async def doctor(self, env: Mapping[str, str]) -> list[Check]:
        from .doctor import check_keys

        return await check_keys(env)

    async def estimate(self, env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
        from .estimate import estimate

        return estimate(env, request)


SPEC = OpenAISpec()
