"""What every keyed model provider (API keys, a quota, a price) shares, so that each one
only says what differs: its request, its SDK call, its error verdicts, its usage, its
answer's reading.

A call goes: profile, model and price of the batch (the provider's settings ``choose``) ->
input tokens by the provider's rule -> the batch's budget reserves the call's worst case
(or pauses the batch) -> ``calls.QuotaCaller`` (concurrency slot, shared quota, a key of the
pool, the provider's ``send`` and ``classify``) -> the provider's ``usage_of`` -> its real
cost replaces the reservation -> the provider's ``read`` (``answers``: decode, the one
local repair, validation) or ``analyzer_invalid_output`` with the tokens still billed.

``KeyedConfig`` is the same for the settings: each provider declares its own
``<NAME>_*`` variables (settings are read by field name) and hands them over in one
provider-neutral struct, which checks them and makes the quota, retry and batch policies.
"""

from __future__ import annotations

import asyncio
import io
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

import msgspec
from PIL import Image
from prometheus_client import Counter

from imagestream.common import pricing, profiles
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig
from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.messages import ImageFacts, Usage
from imagestream.common.providers import (
    Check,
    EstimateRequest,
    ProviderEstimate,
    failure_reason,
    guarded,
)

from ..answers import InvalidOutput
from ..budget import Budgets
from ..calls import CallPolicy, Failure, QuotaCaller, quota_rpm, wanted_concurrency
from ..deferred import BatchJobs, BatchPolicy, JobApi
from ..keypool import KeyPool, KeySpec, parse_keys
from ..limiter import Project, QuotaLimits
from .base import Analysis, Deferred, PaidError

Client = TypeVar("Client")
Answer = TypeVar("Answer")


@dataclass(frozen=True, slots=True)
class KeyedConfig:
    """A keyed provider's settings under neutral names; ``setting`` is the variables'
    prefix (``OPENAI`` for ``OPENAI_RPM``...), for the messages."""

    setting: str
    api_keys: list[str]
    project_limits: list[str]
    limits: QuotaLimits
    timeout_s: float
    attempts: int
    backoff_s: float
    window_s: float
    margin_s: float
    burst_s: float
    quarantine_s: float
    max_inflight: int
    batch_max_requests: int
    batch_linger_s: float
    batch_poll_s: float
    batch_max_jobs: int

    @classmethod
    def of(cls, settings: object, prefix: str) -> KeyedConfig:
        """From a settings struct whose fields carry the provider's prefix
        (``openai_api_keys`` <- ``OPENAI_API_KEYS``...); ``<prefix>_rpd`` is optional."""

        def field(name: str) -> Any:
            return getattr(settings, f"{prefix}_{name}")

        return cls(
            setting=prefix.upper(),
            api_keys=field("api_keys"),
            project_limits=field("project_limits"),
            limits=QuotaLimits(field("rpm"), field("tpm"), getattr(settings, f"{prefix}_rpd", 0)),
            timeout_s=field("timeout_s"),
            attempts=field("attempts"),
            backoff_s=field("backoff_s"),
            window_s=field("quota_window_s"),
            margin_s=field("quota_margin_s"),
            burst_s=field("quota_burst_s"),
            quarantine_s=field("quarantine_s"),
            max_inflight=field("max_inflight"),
            batch_max_requests=field("batch_max_requests"),
            batch_linger_s=field("batch_linger_s"),
            batch_poll_s=field("batch_poll_s"),
            batch_max_jobs=field("batch_max_jobs"),
        )

    def check(self) -> None:
        """ValueError naming the variables when a value is out of range."""
        s = self.setting
        if min(self.limits.rpm, self.limits.tpm, self.limits.rpd) < 0:
            raise ValueError(f"{s}_RPM, {s}_TPM (and {s}_RPD, if it has one) must be >= 0")
        if self.attempts < 1 or self.max_inflight < 1:
            raise ValueError(f"{s}_ATTEMPTS and {s}_MAX_INFLIGHT must be >= 1")
        if (
            min(self.batch_max_requests, self.batch_max_jobs) < 1
            or min(self.batch_linger_s, self.batch_poll_s) <= 0
        ):
            raise ValueError(
                f"{s}_BATCH_MAX_REQUESTS and {s}_BATCH_MAX_JOBS must be >= 1,"
                f" {s}_BATCH_LINGER_S and {s}_BATCH_POLL_S > 0"
            )
        if self.window_s <= 0 or self.margin_s < 0:
            raise ValueError(f"{s}_QUOTA_WINDOW_S must be > 0, {s}_QUOTA_MARGIN_S >= 0")
        self.key_specs()

    def key_specs(self) -> tuple[list[KeySpec], dict[str, Project]]:
        return parse_keys(self.api_keys, self.project_limits, self.limits, setting=self.setting)

    def quota_rpm(self) -> float:
        """Requests per minute of all projects together (0: one is unlimited); without
        keys, what one project at the default quota takes."""
        return quota_rpm(self.key_specs()[1]) if self.api_keys else float(self.limits.rpm)

    def policy(self) -> CallPolicy:
        return CallPolicy(
            window_s=self.window_s,
            margin_s=self.margin_s,
            burst_s=self.burst_s,
            max_inflight=self.max_inflight,
            attempts=self.attempts,
            backoff_s=self.backoff_s,
        )

    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(
            max_requests=self.batch_max_requests,
            linger_s=self.batch_linger_s,
            poll_s=self.batch_poll_s,
            max_jobs=self.batch_max_jobs,
            attempts=self.attempts,
            backoff_s=self.backoff_s,
        )


@dataclass(frozen=True, slots=True)
class Choice:
    """A batch's profile, model and price, and the response schema in the provider's
    dialect (what its request carries)."""

    compiled: profiles.CompiledProfile
    model: str
    price: pricing.Price
    schema: dict[str, Any]


class KeyedSettingsStruct(msgspec.Struct, kw_only=True, frozen=True):
    """What the settings struct of a keyed provider (fields ``<prefix>_api_keys``,
    ``<prefix>_rpm``..., ``<prefix>_model``) does with them; the subclass adds its fields
    and its ``prices`` and ``choose``."""

    prefix: ClassVar[str]
    #: A directory of extra analysis profiles (*.json).
    profiles_dir: str | None = None

    def __post_init__(self) -> None:
        self.keyed().check()
        try:
            self.prices()
        except pricing.PriceError as exc:
            raise ValueError(str(exc)) from None

    def keyed(self) -> KeyedConfig:
        return KeyedConfig.of(self, self.prefix)

    @property
    def default_model(self) -> str:
        return str(getattr(self, f"{self.prefix}_model"))

    def prices(self) -> dict[str, pricing.Price]:
        raise NotImplementedError


class KeyedSettings(Protocol):
    @property
    def default_model(self) -> str: ...

    def keyed(self) -> KeyedConfig: ...

    def choose(self, profile: str | None, model: str | None) -> Choice: ...


Settings = TypeVar("Settings", bound=KeyedSettings)


@dataclass(frozen=True, slots=True)
class HttpErrors:
    """The exception classes of an SDK that Stainless generates (openai, anthropic): one
    hierarchy under the same names, so one verdict (see ``calls``) serves them all."""

    #: ``APIStatusError`` (``status_code``, ``message``, ``response``).
    status: type[Exception]
    #: ``APITimeoutError`` (also a connection error: checked first).
    timeout: type[Exception]
    connection: type[Exception]
    #: ``APIResponseValidationError``: a body that is not the answer's type.
    validation: type[Exception]
    #: Seconds to wait after a 429, from the response's headers.
    retry_hint: Callable[[Mapping[str, str]], float | None]
    #: What a body that is not an answer is, for the item's error ("... is not a Message").
    unreadable: str

    def classify(
        self, exc: Exception, refused: str, timeout_s: float | None = None
    ) -> Failure | None:
        """What an SDK exception means for a call (``refused`` names a 4xx's refuser)."""
        if isinstance(exc, self.timeout):
            waited = f"no answer within {timeout_s:g} s" if timeout_s else "no answer in time"
            return Failure("transient", "timeout", waited, overloaded=True)
        if isinstance(exc, self.connection):
            return Failure("transient", "connection_error", f"connection failed: {exc}")
        if isinstance(exc, self.status):
            status = cast(Any, exc)
            code: int = status.status_code
            if code == 429:
                hint = self.retry_hint(status.response.headers)
                return Failure("rate_limited", "rate_limited", "429", delay=hint)
            if code in (401, 403):
                return Failure("key_rejected", "key_rejected", str(code))
            if code == 529:  # Anthropic's "overloaded"
                return Failure("transient", "overloaded", "529 overloaded", overloaded=True)
            if code < 500 and code != 408:
                return Failure("fatal", "rejected", f"{refused}: {code}: {status.message}")
            return Failure(
                "transient",
                "server_error",
                f"{code}: {status.message}",
                overloaded=code in (503, 504),
            )
        if isinstance(exc, (self.validation, ValueError)):
            return Failure(
                "fatal",
                "unreadable",
                f"{self.unreadable}: {exc}",
                error_class=ErrorClass.ANALYZER_INVALID_OUTPUT,
            )
        return None


def image_size(data: bytes) -> tuple[int, int]:
    """An image's pixels, from its header; ItemError (decode_error) when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.size
    except (OSError, ValueError) as exc:
        raise ItemError(ErrorClass.DECODE_ERROR, f"cannot read the image: {exc}") from None


def image_mime(data: bytes) -> str:
    """The media type of an image the fetcher made (PNG where transparency is kept, else
    JPEG)."""
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


class KeyedProvider(Generic[Settings, Client, Answer]):
    """The runtime provider (``base.Provider``) of a keyed model API. A subclass sets the
    class attributes and implements the methods that raise NotImplementedError."""

    name: ClassVar[str]
    #: The other side in messages ("the server", "Anthropic").
    label: ClassVar[str]
    #: Calls by project and outcome, and what they cost by project.
    requests: ClassVar[Counter]
    cost: ClassVar[Counter]
    #: What publish_status says of a project the server answered 429.
    cooling_reason: ClassVar[str]
    paid = True
    jobs: Deferred | None = None

    def __init__(self, res: Resources, settings: Settings) -> None:
        self.res = res
        self.settings = settings
        keyed = settings.keyed()
        specs, projects = keyed.key_specs()
        self.pool: KeyPool[Client] = KeyPool(
            res.redis,
            res.keys,
            self.name,
            specs,
            projects,
            make_client=self.make_client,
            quarantine_s=keyed.quarantine_s,
        )
        self.caller = QuotaCaller(
            res, self.name, self.label, self.pool, policy=keyed.policy(), requests=self.requests
        )
        self.budgets = Budgets(res)

    # -------------------------------------------------------------- what differs
    def make_client(self, secret: str) -> Client:
        """The SDK client of one key, its own retries off (they would ignore our quota)."""
        raise NotImplementedError

    def request(self, choice: Choice, data: bytes) -> dict[str, Any]:
        """The request for this image: a call's, and a batch job's line."""
        raise NotImplementedError

    def input_tokens(self, choice: Choice, data: bytes) -> int:
        """The call's input tokens by the provider's rule (quota pacing, reservations)."""
        raise NotImplementedError

    async def send(self, client: Client, request: dict[str, Any]) -> Answer:
        """One SDK call."""
        raise NotImplementedError

    def classify(self, exc: Exception) -> Failure | None:
        """What an exception of ``send`` means (see ``calls``); None: not the SDK's."""
        raise NotImplementedError

    def usage_of(self, answer: Answer, price: pricing.Price, mode: pricing.Mode) -> Usage:
        """The answer's tokens and what they cost."""
        raise NotImplementedError

    def read(self, answer: Answer, choice: Choice) -> dict[str, Any]:
        """The flattened, validated analysis; InvalidOutput when unusable."""
        raise NotImplementedError

    async def close_client(self, client: Client) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- what is shared
    @classmethod
    def wanted_concurrency(cls, settings: Settings) -> int:
        """Images an analyzer process holds at once to keep the whole quota busy."""
        keyed = settings.keyed()
        if not keyed.api_keys:
            return 0
        return wanted_concurrency(keyed.key_specs()[1], keyed.policy())

    def choice(self, config: BatchConfig, model: str | None = None) -> Choice:
        """The batch's profile, model (or ``model``: a Batch API job's) and price;
        ItemError when no longer valid."""
        try:
            return self.settings.choose(config.profile, model or config.model)
        except profiles.ProfileError as exc:
            raise ItemError(ErrorClass.ANALYZER_ERROR, str(exc)) from None

    def columns(self, config: BatchConfig) -> list[str]:
        return self.choice(config).compiled.columns

    def schema(self, config: BatchConfig) -> dict[str, dict[str, Any]]:
        return self.choice(config).compiled.column_schemas

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        choice = self.choice(config)
        return choice.compiled.key, choice.model

    def worst_usd(self, choice: Choice, data: bytes, mode: pricing.Mode) -> float:
        """The most a call can cost: its input tokens plus a tenth, the whole output cap."""
        return pricing.cost_usd(
            choice.price,
            input_tokens=math.ceil(self.input_tokens(choice, data) * 1.1) + 16,
            output_tokens=choice.compiled.profile.max_output_tokens,
            mode=mode,
        )

    def count_usage(self, usage: Usage, project: str) -> None:
        self.cost.labels(project).inc(usage.cost_usd)

    def analysis(self, answer: Answer, choice: Choice, usage: Usage) -> dict[str, Any]:
        """The answer's analysis; PaidError (its tokens still billed) when unusable."""
        try:
            return self.read(answer, choice)
        except InvalidOutput as exc:
            raise PaidError(ErrorClass.ANALYZER_INVALID_OUTPUT, str(exc), usage=usage) from None

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis:
        choice = self.choice(config)
        tokens = self.input_tokens(choice, data)
        request = self.request(choice, data)
        reservation = await self.budgets.reserve_or_pause(
            config.id, self.worst_usd(choice, data, "standard")
        )
        usage = Usage()
        try:
            answer, project = await self.caller.call(
                config, choice.model, tokens, lambda client: self.send(client, request),
                self.classify,
            )  # fmt: skip
            usage = self.usage_of(answer, choice.price, "standard")
        finally:
            await self.budgets.settle(reservation, usage.cost_usd)
        self.count_usage(usage, project)
        fields = self.analysis(answer, choice, usage)
        return Analysis(fields=fields, usage=usage, model=choice.model)

    def batch_jobs(self, api: JobApi[Client], events: Counter) -> BatchJobs[Client]:
        """Its Batch API behind the shared machinery (``deferred``)."""
        return BatchJobs(
            self.res,
            api,
            self.pool,
            self.settings.keyed().batch_policy(),
            events=events,
            on_billed=self.count_usage,
        )

    async def start(self) -> None:
        return  # the clients were made with the key pool

    async def report(self, stop: asyncio.Event) -> None:
        """Publish every key's state and its project's quota use for the dashboard."""
        from imagestream.common.runtime import supervise

        await supervise(f"{self.name}-status", self.publish_status, stop, 5.0)

    async def publish_status(self) -> None:
        await self.caller.publish_status(self.settings.default_model, self.cooling_reason)

    async def close(self) -> None:
        for key in self.pool.all_keys():
            await self.close_client(key.client)


class StainlessProvider(KeyedProvider[Settings, Client, Answer]):
    """A keyed provider over an SDK Stainless generates (openai, anthropic): its verdicts
    come from ``errors`` and its clients close alike."""

    errors: ClassVar[HttpErrors]
    #: Who refused a request a 4xx answered ("Anthropic refused the request").
    refused: ClassVar[str]

    def classify(self, exc: Exception) -> Failure | None:
        return self.errors.classify(exc, self.refused, self.settings.keyed().timeout_s)

    async def close_client(self, client: Client) -> None:
        await cast(Any, client).close()


#: What a key check's failure status says, whatever the provider.
KEY_HINTS = {
    401: "the key is not valid",
    403: "the key is not allowed",
    429: "the key is out of quota now",
}


async def probe_key(
    name: str, probe: Awaitable[str], errors: HttpErrors, hints: Mapping[int, str] | None = None
) -> Check:
    """One ``doctor`` row: ``probe`` (a call that spends no tokens) says what it found."""
    started = time.perf_counter()
    try:
        found = await probe
    except errors.status as exc:
        hint = {**KEY_HINTS, **(hints or {})}.get(cast(Any, exc).status_code)
        reason = failure_reason(exc)
        return Check(name, "fail", f"{hint}: {reason}" if hint else reason)
    return Check(name, "ok", f"{found} in {1000 * (time.perf_counter() - started):.0f} ms")


async def check_keys(
    config: KeyedConfig, name: str, check: Callable[[KeySpec], Awaitable[Check]]
) -> list[Check]:
    """``imagestream doctor``'s rows of a keyed provider: ``check`` of each key, at once."""
    keys, _ = config.key_specs()
    if not keys:
        skipped = f"no {config.setting}_API_KEYS: the {name} analyzer is not configured"
        return [Check(name, "skip", skipped, required=False)]
    rows = [guarded(f"{name} key {k.short}", partial(check, k)) for k in keys]
    return list(await asyncio.gather(*rows))


def estimate_by_rule(
    config: KeyedConfig,
    choice: Choice,
    request: EstimateRequest,
    *,
    prompt_tokens: int,
    image_tokens: Callable[[int, int], int],
    rule: str,
) -> ProviderEstimate:
    """``imagestream estimate`` by a provider's token rule of an image (``rule`` names
    it): the sampled images' sizes, or 768x576 without a sample."""
    sizes = [image_size(d) for d in request.sample] or [(768, 576)]
    counts = [prompt_tokens + image_tokens(*size) for size in sizes]
    counted_by = rule if request.sample else "the rule, at 768x576"
    return estimate_from_counts(config, choice, request, counts, counted_by)


def estimate_from_counts(
    config: KeyedConfig,
    choice: Choice,
    request: EstimateRequest,
    counts: list[int],
    counted_by: str,
) -> ProviderEstimate:
    """``imagestream estimate`` from the input tokens of each sampled image's call."""
    profile = choice.compiled.profile
    result = pricing.estimate(
        model=choice.model,
        price=choice.price,
        images=request.images,
        input_tokens_per_image=statistics.fmean(counts),
        output_tokens_per_image=profile.expected_output_tokens or profile.max_output_tokens / 2,
        max_output_tokens=profile.max_output_tokens,
        requests_per_minute=config.quota_rpm(),
    )
    return ProviderEstimate(
        estimate=result, profile=choice.compiled.name, counted_by=counted_by,
        keys=len(config.api_keys),
    )  # fmt: skip
