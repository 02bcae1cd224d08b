"""Typed settings read from the environment (and a ``.env`` file) once at start.

Every field of a settings Struct is read from the upper-cased environment variable of
the same name (``redis_url`` <- ``REDIS_URL``). Values are converted and checked by
msgspec; a bad value stops the service with one line naming the variable.
List fields take comma-separated values.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from dotenv import dotenv_values

from . import guard, hashindex, storage, webhooks


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


class CommonSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Settings every service shares."""

    #: Redis URL (redis://, rediss://, unix://). Unset: the local tools embed a Redis.
    redis_url: str | None = None
    #: PostgreSQL DSN. Unset: the local tools embed a PostgreSQL.
    database_url: str | None = None
    #: Prefix of every Redis key, so several deployments (or tests) can share one Redis.
    redis_prefix: str = "is"
    log_level: str = "INFO"
    log_format: typing.Literal["json", "text"] = "json"
    #: Port of the /metrics and /healthz endpoint of a stage service (unset = the stage's
    #: default, 9101-9104; 0 = any free port; -1 = none). The api serves them on its own port.
    metrics_port: int | None = None
    #: Seconds a stopping service waits for in-flight work before handing it back.
    shutdown_grace_s: float = 20.0
    #: Name of this consumer in its groups; default host-pid-random (unique per process).
    consumer_name: str | None = None
    #: Apply pending schema migrations at start (safe with replicas: they take a lock).
    auto_migrate: bool = True
    #: How often a service pings Redis/PostgreSQL and (one process per deployment, by lease)
    #: collects the stream, dead-stream and batch gauges for /metrics (seconds).
    observe_interval_s: float = 15.0
    #: Buckets (``s3://name``, ``gs://name``) a batch's list may be read from when an api
    #: client names it (``list_url``); none by default. (The CLI reads any list its user
    #: names, with its user's credentials.)
    list_allowed_buckets: tuple[str, ...] = ()
    #: CIDR ranges a list at an http(s) URL may come from although private or loopback.
    list_allowed_cidrs: tuple[str, ...] = ()
    #: Receiver of the events of batches that do not name one (webhooks.py).
    webhook_url: str | None = None
    #: ``whsec_`` secret signing the events of batches that bring none (nor their token).
    webhook_secret: str | None = None
    #: CIDR ranges a webhook receiver may be at although private or loopback.
    webhook_allowed_cidrs: tuple[str, ...] = ()
    #: An event without a 2xx answer this long (seconds) is given up (marked failed).
    webhook_max_age_s: float = 86400.0
    #: First retry after about this long (seconds); each next one waits twice as long...
    webhook_retry_base_s: float = 5.0
    #: ...but never longer than this (seconds).
    webhook_retry_max_s: float = 3600.0
    #: Time a receiver has to answer one attempt (seconds).
    webhook_timeout_s: float = 10.0
    #: An event held this long by a process that died is sent again by another (seconds).
    webhook_lease_s: float = 60.0
    #: Attempts one process makes at once (each to a different batch).
    webhook_concurrency: int = 8
    #: How often a process looks for due events (seconds).
    webhook_poll_s: float = 1.0
    #: Perceptual hashes at most this many bits apart put images in one near-duplicate
    #: group (0 = identical hashes only). A batch keeps the distance it was first grouped
    #: with. Measured in README ("Near-duplicate groups").
    duplicate_max_distance: int = 8

    def __post_init__(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR")
        try:
            storage.parse_buckets(self.list_allowed_buckets)
        except ValueError as exc:
            raise ValueError(f"LIST_ALLOWED_BUCKETS: {exc}") from None
        try:
            guard.parse_cidrs(self.list_allowed_cidrs)
        except ValueError as exc:
            raise ValueError(f"LIST_ALLOWED_CIDRS: {exc}") from None
        try:
            guard.parse_cidrs(self.webhook_allowed_cidrs)
        except ValueError as exc:
            raise ValueError(f"WEBHOOK_ALLOWED_CIDRS: {exc}") from None
        if self.webhook_secret is not None:
            try:
                webhooks.secret_key(self.webhook_secret)
            except webhooks.WebhookError as exc:
                raise ValueError(f"WEBHOOK_SECRET: {exc}") from None
        if self.webhook_url is not None and not self.webhook_url.lower().startswith(
            ("http://", "https://")
        ):
            raise ValueError("WEBHOOK_URL must be an http(s) URL")
        if min(self.webhook_retry_base_s, self.webhook_timeout_s, self.webhook_poll_s) <= 0:
            raise ValueError("WEBHOOK_RETRY_BASE_S, WEBHOOK_TIMEOUT_S, WEBHOOK_POLL_S must be > 0")
        if self.webhook_retry_max_s < self.webhook_retry_base_s:
            raise ValueError("WEBHOOK_RETRY_MAX_S must be at least WEBHOOK_RETRY_BASE_S")
        if self.webhook_max_age_s <= 0:
            raise ValueError("WEBHOOK_MAX_AGE_S must be > 0")
        if self.webhook_lease_s <= self.webhook_timeout_s:
            raise ValueError("WEBHOOK_LEASE_S must be longer than WEBHOOK_TIMEOUT_S")
        if not 1 <= self.webhook_concurrency <= 256:
            raise ValueError("WEBHOOK_CONCURRENCY must be between 1 and 256")
        if self.shutdown_grace_s <= 0:
            raise ValueError("SHUTDOWN_GRACE_S must be > 0")
        if self.observe_interval_s <= 0:
            raise ValueError("OBSERVE_INTERVAL_S must be > 0")
        if not 0 <= self.duplicate_max_distance <= hashindex.MAX_DISTANCE:
            raise ValueError(
                f"DUPLICATE_MAX_DISTANCE must be between 0 and {hashindex.MAX_DISTANCE}"
            )

    def list_buckets(self) -> frozenset[tuple[str, str]]:
        """The buckets an api client's ``list_url`` may name."""
        return storage.parse_buckets(self.list_allowed_buckets)

    def list_address_policy(self) -> guard.AddressPolicy:
        """Where a list at an http(s) URL may be fetched from."""
        return guard.AddressPolicy(guard.parse_cidrs(self.list_allowed_cidrs))

    def webhook_policy(self) -> guard.AddressPolicy:
        """Where webhook receivers may be."""
        return guard.AddressPolicy(guard.parse_cidrs(self.webhook_allowed_cidrs))

    def webhook_delivery(self) -> webhooks.DeliveryConfig:
        return webhooks.DeliveryConfig(
            policy=self.webhook_policy(),
            timeout_s=self.webhook_timeout_s,
            lease_s=self.webhook_lease_s,
            retry_base_s=self.webhook_retry_base_s,
            retry_max_s=self.webhook_retry_max_s,
            max_age_s=self.webhook_max_age_s,
            concurrency=self.webhook_concurrency,
            poll_s=self.webhook_poll_s,
        )


class StreamSettings(CommonSettings, kw_only=True, frozen=True):
    """Settings of a stage that consumes a stream."""

    #: How long a blocking read waits for new entries (ms); below the socket timeout.
    read_block_ms: int = 2000
    #: An entry held this long by a consumer that stopped answering is claimed (ms).
    claim_idle_ms: int = 60_000
    #: How often a worker looks for entries to claim (seconds).
    claim_interval_s: float = 5.0
    #: Deliveries after which an entry goes to the dead stream and its item fails.
    max_deliveries: int = 5
    #: A consumer that holds nothing and was silent this long is removed from its group (ms).
    consumer_stale_ms: int = 600_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.read_block_ms <= 0 or self.claim_idle_ms <= 0 or self.max_deliveries < 1:
            raise ValueError("READ_BLOCK_MS, CLAIM_IDLE_MS and MAX_DELIVERIES must be positive")
        if self.claim_idle_ms <= self.read_block_ms:
            raise ValueError("CLAIM_IDLE_MS must be longer than READ_BLOCK_MS")
        if self.consumer_stale_ms <= self.read_block_ms:
            raise ValueError("CONSUMER_STALE_MS must be longer than READ_BLOCK_MS")


S = TypeVar("S", bound=msgspec.Struct)

_FIELD_PATH = re.compile(r"at `\$\.(\w+)`")
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|URL")


def _is_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, tuple, frozenset, set):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp))
    return False


def environment(env_file: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The process environment over the values of ``.env`` (the environment wins)."""
    path = Path(env_file or os.environ.get("IMAGESTREAM_ENV_FILE", ".env"))
    merged: dict[str, str] = {}
    if path.is_file():
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ)
    return merged


def load(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from the environment, or raise SettingsError with one clear line."""
    source = environment() if env is None else env
    hints = typing.get_type_hints(cls)
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        value = source.get(field.name.upper())
        if value is None:
            continue
        value = value.strip()
        if _is_list(hints[field.name]):
            raw[field.name] = [part.strip() for part in value.split(",") if part.strip()]
        elif value == "" and field.default is None:
            raw[field.name] = None
        else:
            raw[field.name] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _FIELD_PATH.search(text)
        reason = _FIELD_PATH.sub("", text).strip().rstrip("-").strip()
        if match:
            name = match.group(1).upper()
            # Values that may hold credentials are never echoed.
            shown = "" if _SECRET_NAME.search(name) else f"={source.get(name, '')!r}"
            raise SettingsError(f"invalid setting {name}{shown}: {reason}") from None
        raise SettingsError(f"invalid settings: {reason}") from None
