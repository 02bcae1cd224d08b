"""What every provider implements and shares: the Provider interface, an analysis, the
exceptions that end an item's analysis, and pausing a batch on a provider's behalf."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from imagestream.common import control, ledger
from imagestream.common.connections import Resources
from imagestream.common.control import BatchConfig
from imagestream.common.errors import ItemError
from imagestream.common.messages import AnalyzeTask, ImageFacts, Usage
from imagestream.common.worker import Out

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Analysis:
    fields: dict[str, Any]
    usage: Usage | None = None
    model: str | None = None


@dataclass(slots=True)
class PaidError(ItemError):
    """The item failed after tokens were spent on it: the cost is still the batch's."""

    usage: Usage | None = None


class Halted(Exception):
    """The item's batch was paused (budget reached, no usable key, by a user) or cancelled
    before its analysis was sent: the item goes back to pending, or is cancelled."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state


async def pause_batch(res: Resources, batch_id: str, reason: str) -> None:
    """Pause a batch on behalf of the analyzer, as the API's pause does."""
    try:
        await ledger.pause_batch(res.pool, uuid.UUID(batch_id), reason)
    except ledger.Conflict:
        return  # already paused (another replica got there first), or finished
    await control.set_halted(res.redis, res.keys, batch_id, "paused")
    log.warning("batch paused: %s", reason, extra={"batch": batch_id, "reason": reason})


class Deferred(Protocol):
    """A provider's Batch API (``mode: batch``): items are sent in jobs answered within
    hours. ``submit`` takes an item (its result comes later: the outputs are usually none);
    ``run`` polls the jobs out, collects their answers and cancels the jobs of cancelled
    batches until ``stop``; ``close`` sends what is still waiting, or hands it back."""

    async def submit(
        self, task: AnalyzeTask, data: bytes, config: BatchConfig
    ) -> Sequence[Out]: ...

    async def run(self, stop: asyncio.Event) -> None: ...

    async def close(self) -> None: ...


class Provider(Protocol):
    name: str
    #: Whether an analysis costs money: a paid provider sends nothing for a paused batch
    #: (its items go back to pending), a free one finishes the work already in flight.
    paid: bool
    #: Its Batch API, when it has one.
    jobs: Deferred | None

    def columns(self, config: BatchConfig) -> list[str]:
        """The analysis fields this provider returns for the batch, in export order."""
        ...

    def schema(self, config: BatchConfig) -> dict[str, dict[str, Any]]:
        """The JSON Schema of each of ``columns``' fields' values: exports type their
        columns by it (Parquet), a field left out is exported as text."""
        ...

    def cache_key(self, config: BatchConfig) -> tuple[str, str]:
        """(profile key, model): with the content's sha256 and the provider's name, what
        identifies an analysis in the cache. Change the profile key when answers change."""
        ...

    async def analyze(self, data: bytes, facts: ImageFacts, config: BatchConfig) -> Analysis:
        """Raises ItemError (the item fails) or Halted (its batch stopped meanwhile)."""
        ...

    async def start(self) -> None:
        """Get ready before the analyzer takes items (load and warm models); raise
        ``settings.SettingsError`` (one line) when the provider cannot run here."""
        ...

    async def report(self, stop: asyncio.Event) -> None:
        """Publish the provider's state for the dashboard until ``stop`` (if it has any)."""
        ...

    async def close(self) -> None: ...
