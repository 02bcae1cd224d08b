"""The ``openai`` provider: OpenAI-compatible chat completions (OpenAI, OpenRouter, vLLM,
Ollama, LM Studio, TGI) through the official ``openai`` SDK.

``SPEC`` is what the registry (``imagestream.common.providers``) loads; it imports the SDK
only when an analyzer, ``doctor`` or ``estimate`` asks for the real thing.
"""

from __future__ import annotations

from ..spec import KeyedSpec


class OpenAISpec(KeyedSpec):
    name = "openai"
    title = "OpenAI-compatible (OpenAI, vLLM, Ollama...)"
    settings_type = "OpenAISettings"
    provider_type = "OpenAIProvider"


SPEC = OpenAISpec()
