"""The Gemini API keys of a deployment, grouped by Google Cloud project, and their quarantine.

``GEMINI_API_KEYS`` lists keys, comma-separated; ``KEY@PROJECT`` puts a key in a project.
Quota belongs to the project: keys of one project share its RPM/TPM/RPD, so adding a key
to a project adds no capacity, while a key in another project does. A key without a
project is a project of its own (named ``key-<short hash>``). Limits default to
``GEMINI_RPM``/``GEMINI_TPM``/``GEMINI_RPD``; ``GEMINI_PROJECT_LIMITS`` sets them per
project: ``PROJECT:rpm=N:tpm=N:rpd=N`` (any subset, 0 = no limit), comma-separated.

A key answered with 401/403 (or 400 ``API_KEY_INVALID``) is quarantined for
``GEMINI_QUARANTINE_S`` in the Redis hash ``gemini:quarantine``, shared by every replica;
keys are only ever shown (logs, metrics, Redis) by their short hash, the first 8 hex
digits of their sha256.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from google import genai
from google.genai import types
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis

from imagestream.common.keys import Keys

from ...limiter import Project, QuotaLimits

log = logging.getLogger(__name__)

KEYS_QUARANTINED = Counter(
    "imagestream_gemini_keys_quarantined_total",
    "Gemini API keys this process quarantined after a 401/403 answer.",
)
KEYS_USABLE = Gauge("imagestream_gemini_keys_usable", "Gemini API keys not quarantined.")

_PROJECT = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_REFRESH_S = 2.0


def short_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class KeySpec:
    secret: str = field(repr=False)
    project: str

    @property
    def short(self) -> str:
        return short_hash(self.secret)


def parse_keys(
    entries: Sequence[str], project_limits: Sequence[str], defaults: QuotaLimits
) -> tuple[list[KeySpec], dict[str, Project]]:
    """Keys and projects from the settings; ValueError (never showing a key) when malformed."""
    specs: list[KeySpec] = []
    for position, entry in enumerate(entries, 1):
        secret, _, project = entry.partition("@")
        secret = secret.strip()
        if not secret:
            raise ValueError(f"GEMINI_API_KEYS entry {position} has no key")
        project = project.strip() or f"key-{short_hash(secret)}"
        if not _PROJECT.match(project):
            raise ValueError(f"GEMINI_API_KEYS entry {position}: bad project name")
        specs.append(KeySpec(secret, project))
    if len({s.secret for s in specs}) != len(specs):
        raise ValueError("GEMINI_API_KEYS lists a key twice")
    limits = {s.project: defaults for s in specs}
    for entry in project_limits:
        name, *pairs = entry.strip().split(":")
        if name not in limits:
            raise ValueError(f"GEMINI_PROJECT_LIMITS names {name!r}, a project without keys")
        values = {"rpm": limits[name].rpm, "tpm": limits[name].tpm, "rpd": limits[name].rpd}
        for pair in pairs:
            metric, _, number = pair.partition("=")
            if metric not in values or not number.isdigit():
                raise ValueError(f"GEMINI_PROJECT_LIMITS {entry!r}: use PROJECT:rpm=N:tpm=N:rpd=N")
            values[metric] = int(number)
        limits[name] = QuotaLimits(**values)
    return specs, {name: Project(name, quota) for name, quota in limits.items()}


@dataclass
class ApiKey:
    spec: KeySpec
    client: genai.Client

    @property
    def short(self) -> str:
        return self.spec.short

    @property
    def project(self) -> str:
        return self.spec.project


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


class KeyPool:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        specs: Sequence[KeySpec],
        projects: dict[str, Project],
        *,
        base_url: str | None,
        api_version: str,
        timeout_s: float,
        quarantine_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.projects = projects
        self.quarantine_s = quarantine_s
        self._keys = [
            ApiKey(s, make_client(s.secret, base_url=base_url, api_version=api_version,
                                  timeout_s=timeout_s))
            for s in specs
        ]  # fmt: skip
        self._quarantined: set[str] = set()
        self._turns = {
            name: itertools.cycle([k for k in self._keys if k.project == name]) for name in projects
        }
        self._refreshed_at = 0.0
        KEYS_USABLE.set(len(self._keys))

    def all_keys(self) -> list[ApiKey]:
        return list(self._keys)

    def is_quarantined(self, key: ApiKey) -> bool:
        return key.short in self._quarantined

    def usable_projects(self) -> list[Project]:
        alive = {k.project for k in self._keys if k.short not in self._quarantined}
        return [p for name, p in self.projects.items() if name in alive]

    def key_for(self, project: Project) -> ApiKey:
        """The next usable key of the project (round robin: they share its quota)."""
        for _ in range(len(self._keys)):
            key = next(self._turns[project.name])
            if key.short not in self._quarantined:
                return key
        raise LookupError(f"no usable key in project {project.name}")

    async def refresh(self) -> None:
        """Learn the quarantines of other replicas (at most every two seconds)."""
        now = time.time()
        if now - self._refreshed_at < _REFRESH_S:
            return
        self._refreshed_at = now
        raw = await self.redis.hgetall(self.keys.gemini_quarantine)
        current: set[str] = set()
        for short, value in raw.items():
            until = float((value.decode() if isinstance(value, bytes) else value).split("|")[0])
            if until > now:
                current.add(short.decode() if isinstance(short, bytes) else short)
        self._quarantined = current
        KEYS_USABLE.set(sum(k.short not in current for k in self._keys))

    async def quarantine(self, key: ApiKey, reason: str) -> None:
        if key.short in self._quarantined:
            return
        self._quarantined.add(key.short)
        until = time.time() + self.quarantine_s
        await self.redis.hset(self.keys.gemini_quarantine, key.short, f"{until}|{reason}")
        await self.redis.expire(self.keys.gemini_quarantine, int(self.quarantine_s) + 60)
        KEYS_QUARANTINED.inc()
        KEYS_USABLE.set(sum(k.short not in self._quarantined for k in self._keys))
        log.error(
            "Gemini API key %s (project %s) quarantined for %.0f s: %s",
            key.short,
            key.project,
            self.quarantine_s,
            reason,
            extra={"key": key.short, "project": key.project},
        )

    async def close(self) -> None:
        for key in self._keys:
            await key.client.aio.aclose()
