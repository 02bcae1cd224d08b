"""In-flight item states in the ledger (fetching -> analyzing -> writing), written in bulk.

The stages report each item as it moves on; a background flush writes them once a second
with one UPDATE per state. The states are informative (the item page, the reconciler's
age check): the terminal state is written by the writer alone, and a late report never
moves an item backwards.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from . import ledger
from .runtime import supervise

log = logging.getLogger(__name__)


class ItemProgress:
    def __init__(self, pool: asyncpg.Pool, every_s: float = 1.0) -> None:
        self.pool = pool
        self.every_s = every_s
        self._pending: dict[str, list[int]] = {"analyzing": [], "writing": []}

    def mark(self, item_id: int, state: str) -> None:
        self._pending[state].append(item_id)

    async def flush(self) -> None:
        for state, ids in self._pending.items():
            if ids:
                self._pending[state] = []
                await ledger.advance_items(self.pool, ids, state)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await supervise("item-progress", self.flush, stop, self.every_s)
        finally:
            await self.flush()
