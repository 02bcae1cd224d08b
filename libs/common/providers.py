"""The registry of analysis providers: the one list every part that offers a choice reads.

A provider is a package (``services/analyzer/providers/<name>/``) that exposes a light
``ProviderSpec`` object, registered by one line of ``pyproject.toml``::

    [project.entry-points."imagestream.providers"]
    openai = "imagestream.analyzer.providers.openai:SPEC"

The api, the CLI and the analyzer find providers here, by entry point, never by importing
a provider package by name: so the api (which imports only ``imagestream.common``) offers a
new provider in its field validation, ``/api/v1/system`` and OpenAPI enum, the dashboard
lists it, ``imagestream estimate`` and ``doctor`` check it, and the analyzer runs it, with
no edit anywhere but the provider's own package and that line. A spec imports only the
standard library and ``imagestream.common`` at import time; its ``create``, ``doctor`` and
``estimate`` hooks import the provider's SDK when they are called.

``resolve_batch`` is the one place that checks a new batch's analyzer settings (API form
fields, CLI options): the analyzer's name, then the spec's own check of profile and model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import metadata
from typing import Any, Literal, Protocol, runtime_checkable

from .profiles import ProfileError

log = logging.getLogger(__name__)

ENTRY_POINTS = "imagestream.providers"
DEFAULT_ANALYZER = "local"
MAX_BUDGET_USD = 1_000_000
#: How a batch's calls are sent: one by one at once (standard), or grouped into the
#: provider's Batch API jobs at a lower price, answered within hours (batch).
MODES = ("standard", "batch")
#: Bounds of a batch's ``long_side`` option (the analysis image's long side, in pixels).
MIN_LONG_SIDE, MAX_LONG_SIDE = 32, 4096

CheckStatus = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    """One row of ``imagestream doctor``."""

    name: str
    status: CheckStatus
    detail: str
    #: A failed required check makes the exit status non-zero.
    required: bool = True


#: aiohttp's connection errors print the SSL context object: noise in a row.
_SSL_REPR = re.compile(r" ssl:<[^>]*>")
#: How long one doctor check may take.
CHECK_TIMEOUT_S = 10.0


def failure_reason(exc: BaseException) -> str:
    """An exception as the one-line detail of a failed check."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return _SSL_REPR.sub("", text)[:300]


async def guarded(name: str, probe: Callable[[], Awaitable[Check]]) -> Check:
    """Run a check; whatever it raises (or a hang) becomes a failed row."""
    try:
        return await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT_S + 5)
    except TimeoutError:
        return Check(name, "fail", f"no answer within {CHECK_TIMEOUT_S + 5:.0f} s")
    except Exception as exc:
        return Check(name, "fail", failure_reason(exc))


@dataclass(frozen=True, slots=True)
class EstimateRequest:
    """What ``imagestream estimate`` hands a provider: the batch's choice and a sample of
    the list's images, made as the fetcher would make them."""

    profile: str | None
    model: str | None
    images: int
    sample: list[bytes]
    offline: bool


@dataclass(frozen=True, slots=True)
class ProviderEstimate:
    """A provider's answer to an estimate (``pricing.Estimate`` plus how it was made)."""

    estimate: Any  # pricing.Estimate
    profile: str
    counted_by: str
    keys: int


@runtime_checkable
class ProviderSpec(Protocol):
    """What a provider package tells the rest of imagestream about itself."""

    #: The analyzer's name in batches, the API and the CLI (``--analyzer NAME``).
    name: str
    #: For people (the dashboard's choice).
    title: str
    #: Whether an analysis costs money: budgets apply, a paused batch sends nothing.
    paid: bool
    #: The batch modes it offers (``standard``; ``batch`` when it has a Batch API).
    modes: tuple[str, ...]
    #: Whether it has API keys whose state analyzers publish (``{p}:{name}:status``).
    keyed: bool

    def choose(
        self, profile: str | None, model: str | None, env: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        """The batch's profile and model, checked (ProfileError naming the choices)."""
        ...

    def long_side(self, profile: str | None) -> int | None:
        """The analysis image's long side a batch of this profile gets when it names none
        (None: the fetcher's ``ANALYSIS_LONG_SIDE``), e.g. more pixels for reading text."""
        ...

    def missing(self, env: Mapping[str, str]) -> str | None:
        """Why this provider cannot run with these settings (no key), or None."""
        ...

    def load_settings(self, env: Mapping[str, str]) -> Any:
        """Its settings struct (``settings.SettingsError`` when one is invalid)."""
        ...

    def concurrency(self, settings: Any) -> int:
        """Images an analyzer process should hold at once for it (0: no preference)."""
        ...

    def create(self, res: Any, settings: Any) -> Any:
        """The runtime provider (``imagestream.analyzer.providers.base.Provider``)."""
        ...

    async def doctor(self, env: Mapping[str, str]) -> list[Check]:
        """Its rows of ``imagestream doctor`` (each key checked, or why it was not)."""
        ...

    async def estimate(self, env: Mapping[str, str], request: EstimateRequest) -> ProviderEstimate:
        """Tokens, cost and duration of a list (ProfileError when it cannot say)."""
        ...


@functools.cache
def registry() -> dict[str, ProviderSpec]:
    """Every installed provider by name (``local`` first, then by name)."""
    found: dict[str, ProviderSpec] = {}
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        spec = entry.load()
        if not isinstance(spec, ProviderSpec) or spec.name != entry.name:
            raise TypeError(f"entry point {entry.value} is not the ProviderSpec of {entry.name}")
        found[entry.name] = spec
    order = sorted(found, key=lambda name: (name != DEFAULT_ANALYZER, name))
    return {name: found[name] for name in order}


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> ProviderSpec:
    """The provider of that name; ProfileError naming the choices otherwise."""
    spec = registry().get(name)
    if spec is None:
        raise ProfileError(f"analyzer must be one of {', '.join(registry())}")
    return spec


# ---------------------------------------------------------------- batch creation
@dataclass(frozen=True, slots=True)
class BatchChoice:
    """A batch's validated analyzer settings, as stored in its ledger row."""

    analyzer: str
    profile: str | None
    model: str | None
    budget_usd: float | None
    options: dict[str, Any]


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ProfileError(f"{name} must be true or false")


def resolve_batch(
    fields: Mapping[str, Any],
    *,
    default_analyzer: str = DEFAULT_ANALYZER,
    env: Mapping[str, str] | None = None,
    require_configured: bool = False,
) -> BatchChoice:
    """Check a new batch's ``analyzer``, ``profile``, ``model``, ``budget_usd``, ``cache``,
    ``long_side`` and ``mode`` fields (strings from a form, or values); raises ProfileError
    with a one-line reason. ``require_configured``: also refuse a provider that these
    settings cannot run (no key), as a run in this process would fail every item."""
    from .settings import environment

    def text(name: str) -> str | None:
        value = fields.get(name)
        if value is None:
            return None
        return str(value).strip() or None

    source = environment() if env is None else env
    spec = get(text("analyzer") or default_analyzer)
    budget: float | None = None
    if (raw_budget := text("budget_usd")) is not None:
        try:
            amount = Decimal(raw_budget)
        except InvalidOperation:
            raise ProfileError(
                "budget_usd must be a number of US dollars, e.g. 25 or 7.50"
            ) from None
        # The budget is kept in nano-dollars in Redis (exact in Lua below 9e15).
        if not amount.is_finite() or not 0 < amount < MAX_BUDGET_USD:
            raise ProfileError(f"budget_usd must be more than 0 and less than {MAX_BUDGET_USD}")
        budget = float(amount)
    options: dict[str, Any] = {}
    if fields.get("cache") is not None and not _flag(fields["cache"], "cache"):
        options["cache"] = False
    if (raw_side := text("long_side")) is not None:
        if not raw_side.isdigit() or not MIN_LONG_SIDE <= int(raw_side) <= MAX_LONG_SIDE:
            raise ProfileError(
                f"long_side must be a whole number of pixels, {MIN_LONG_SIDE} to {MAX_LONG_SIDE}"
            )
        options["long_side"] = int(raw_side)
    mode = text("mode") or "standard"
    if mode not in MODES:
        raise ProfileError(f"mode must be one of {', '.join(MODES)}")
    if mode not in spec.modes:
        offering = [s.name for s in registry().values() if mode in s.modes]
        raise ProfileError(
            f"mode {mode} (a Batch API) needs analyzer {' or '.join(offering) or '(none)'}"
        )
    if mode == "batch":
        options["mode"] = "batch"
    if require_configured and (reason := spec.missing(source)) is not None:
        raise ProfileError(f"analyzer {spec.name} is not configured here: {reason}")
    profile, model = spec.choose(text("profile"), text("model"), source)
    if "long_side" not in options and (side := spec.long_side(profile)) is not None:
        options["long_side"] = side
    return BatchChoice(spec.name, profile, model, budget, options)


def is_batch_mode(options: Mapping[str, Any]) -> bool:
    """Whether a batch's items go through its provider's Batch API."""
    return options.get("mode") == "batch"
