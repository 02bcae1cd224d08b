"""Gemini's API keys: one google-genai client per key, in the shared key pool (``keypool``)."""

from __future__ import annotations

from google import genai
from google.genai import types

from ...keypool import ApiKey, KeyPool

GeminiKey = ApiKey[genai.Client]
GeminiKeys = KeyPool[genai.Client]


def make_client(
    secret: str, *, base_url: str | None, api_version: str, timeout_s: float
) -> genai.Client:
    return genai.Client(
        api_key=secret,
        http_options=types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            timeout=int(timeout_s * 1000),
            # The SDK's retries would ignore the server's retry delay and our quota: off.
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


async def close_clients(pool: GeminiKeys) -> None:
    for key in pool.all_keys():
        await key.client.aio.aclose()
