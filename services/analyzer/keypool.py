"""API keys of a provider, grouped by the quota holder they draw on, and their quarantine.

``<PROVIDER>_API_KEYS`` lists keys, comma-separated; ``KEY@PROJECT`` puts a key in a
project (Gemini: a Google Cloud project; OpenAI: an organisation or project; a self-hosted
server: anything). Quota belongs to the project: keys of one project share its limits, so
adding a key to a project adds no capacity, while a key in another project does. A key
without a project is a project of its own (named ``key-<short hash>``). Limits default to
the provider's ``*_RPM``/``*_TPM``/``*_RPD``; ``<PROVIDER>_PROJECT_LIMITS`` sets them per
project: ``PROJECT:rpm=N:tpm=N:rpd=N`` (any subset, 0 = no limit), comma-separated.

A key answered with 401/403 is quarantined for the provider's quarantine time in the Redis
hash ``{provider}:quarantine``, shared by every replica; keys are only ever shown (logs,
metrics, Redis) by their short hash, the first 8 hex digits of their sha256.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis

from imagestream.common.keys import Keys

from .limiter import Project, QuotaLimits

log = logging.getLogger(__name__)

KEYS_QUARANTINED = Counter(
    "imagestream_provider_keys_quarantined_total",
    "API keys this process quarantined after a 401/403 answer, per provider.",
    ["provider"],
)
KEYS_USABLE = Gauge(
    "imagestream_provider_keys_usable", "API keys not quarantined, per provider.", ["provider"]
)

_PROJECT = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_REFRESH_S = 2.0

Client = TypeVar("Client")


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
    entries: Sequence[str],
    project_limits: Sequence[str],
    defaults: QuotaLimits,
    *,
    setting: str = "GEMINI",
) -> tuple[list[KeySpec], dict[str, Project]]:
    """Keys and projects from the settings ``{setting}_API_KEYS`` and
    ``{setting}_PROJECT_LIMITS``; ValueError (never showing a key) when malformed."""
    keys_name, limits_name = f"{setting}_API_KEYS", f"{setting}_PROJECT_LIMITS"
    specs: list[KeySpec] = []
    for position, entry in enumerate(entries, 1):
        secret, _, project = entry.partition("@")
        secret = secret.strip()
        if not secret:
            raise ValueError(f"{keys_name} entry {position} has no key")
        project = project.strip() or f"key-{short_hash(secret)}"
        if not _PROJECT.match(project):
            raise ValueError(f"{keys_name} entry {position}: bad project name")
        specs.append(KeySpec(secret, project))
    if len({s.secret for s in specs}) != len(specs):
        raise ValueError(f"{keys_name} lists a key twice")
    limits = {s.project: defaults for s in specs}
    for entry in project_limits:
        name, *pairs = entry.strip().split(":")
        if name not in limits:
            raise ValueError(f"{limits_name} names {name!r}, a project without keys")
        values = {"rpm": limits[name].rpm, "tpm": limits[name].tpm, "rpd": limits[name].rpd}
        for pair in pairs:
            metric, _, number = pair.partition("=")
            if metric not in values or not number.isdigit():
                raise ValueError(f"{limits_name} {entry!r}: use PROJECT:rpm=N:tpm=N:rpd=N")
            values[metric] = int(number)
        limits[name] = QuotaLimits(**values)
    return specs, {name: Project(name, quota) for name, quota in limits.items()}


@dataclass
class ApiKey(Generic[Client]):
    spec: KeySpec
    client: Client

    @property
    def short(self) -> str:
        return self.spec.short

    @property
    def project(self) -> str:
        return self.spec.project


class KeyPool(Generic[Client]):
    """The keys of one provider, each with its client, taken round robin per project."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        provider: str,
        specs: Sequence[KeySpec],
        projects: dict[str, Project],
        *,
        make_client: Callable[[str], Client],
        quarantine_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.provider = provider
        self.projects = projects
        self.quarantine_s = quarantine_s
        self._keys = [ApiKey(s, make_client(s.secret)) for s in specs]
        self._quarantined: set[str] = set()
        self._turns = {
            name: itertools.cycle([k for k in self._keys if k.project == name]) for name in projects
        }
        self._refreshed_at = 0.0
        self._usable = KEYS_USABLE.labels(provider)
        self._usable.set(len(self._keys))

    def all_keys(self) -> list[ApiKey[Client]]:
        return list(self._keys)

    def is_quarantined(self, key: ApiKey[Client]) -> bool:
        return key.short in self._quarantined

    def usable_projects(self) -> list[Project]:
        alive = {k.project for k in self._keys if k.short not in self._quarantined}
        return [p for name, p in self.projects.items() if name in alive]

    def key_for(self, project: Project) -> ApiKey[Client]:
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
        raw = await self.redis.hgetall(self.keys.quarantine(self.provider))
        current: set[str] = set()
        for short, value in raw.items():
            until = float((value.decode() if isinstance(value, bytes) else value).split("|")[0])
            if until > now:
                current.add(short.decode() if isinstance(short, bytes) else short)
        self._quarantined = current
        self._usable.set(sum(k.short not in current for k in self._keys))

    async def quarantine(self, key: ApiKey[Client], reason: str) -> None:
        if key.short in self._quarantined:
            return
        self._quarantined.add(key.short)
        until = time.time() + self.quarantine_s
        name = self.keys.quarantine(self.provider)
        await self.redis.hset(name, key.short, f"{until}|{reason}")
        await self.redis.expire(name, int(self.quarantine_s) + 60)
        KEYS_QUARANTINED.labels(self.provider).inc()
        self._usable.set(sum(k.short not in self._quarantined for k in self._keys))
        log.error(
            "%s API key %s (project %s) quarantined for %.0f s: %s",
            self.provider,
            key.short,
            key.project,
            self.quarantine_s,
            reason,
            extra={"key": key.short, "project": key.project, "provider": self.provider},
        )
