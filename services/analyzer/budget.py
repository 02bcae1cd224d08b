"""Per-batch budgets: a call is paid for before it is sent, so a batch never exceeds its budget.

Each paid call first reserves its worst-case cost (its input tokens by its provider's rules
plus a tenth, and the whole output-token cap) in the batch's Redis hash ``budget:{batch}``; the
reservation fails when spent + reserved + this call would pass ``budget_usd``, and then the
batch is paused with reason ``budget_reached`` before anything more is spent. When the
answer arrives the reservation is replaced by the real cost. Amounts are integers of
nano-USD (exact in Lua up to 9 million dollars).

``spent`` starts from the ledger's ``cost_usd`` the first time a batch reserves (and again
if Redis lost its data); from then on it moves at answer time, ahead of the writer, so
every replica sees the spend of every other at once.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from imagestream.common.connections import Resources

from .providers.base import Halted, pause_batch

NANO = 1_000_000_000
_TTL_S = 7 * 86_400
_LOOKUP_TTL_S = 2.0  # a budget raised by an operator is seen within this time

# KEYS[1] the batch's budget hash; ARGV: budget, amount, spent per the ledger (all nano-USD),
# ttl. Returns 1 and reserves the amount, or 0 when it would pass the budget.
RESERVE_LUA = """
redis.call('HSETNX', KEYS[1], 'spent', ARGV[3])
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent'))
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
redis.call('EXPIRE', KEYS[1], ARGV[4])
if spent + reserved + tonumber(ARGV[2]) > tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
return 1
"""


def nano(usd: float | Decimal) -> int:
    return round(Decimal(str(usd)) * NANO)


class BudgetReached(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Reservation:
    key: str
    amount: int


@dataclass
class Budgets:
    res: Resources
    _known: dict[str, tuple[float, Decimal | None, Decimal]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reserve = self.res.redis.register_script(RESERVE_LUA)

    async def _budget_of(self, batch_id: str) -> tuple[Decimal | None, Decimal]:
        now = time.monotonic()
        known = self._known.get(batch_id)
        if known is None or now - known[0] > _LOOKUP_TTL_S:
            row = await self.res.pool.fetchrow(
                "SELECT budget_usd, cost_usd FROM batches WHERE id = $1", uuid.UUID(batch_id)
            )
            budget, spent = (row["budget_usd"], row["cost_usd"]) if row else (None, Decimal(0))
            known = self._known[batch_id] = (now, budget, spent)
        return known[1], known[2]

    async def reserve(self, batch_id: str, worst_case_usd: float) -> Reservation | None:
        """Reserve a call's worst-case cost; None when the batch has no budget.

        Raises BudgetReached when the call could take the batch past its budget.
        """
        budget, spent = await self._budget_of(batch_id)
        if budget is None:
            return None
        key = self.res.keys.budget(batch_id)
        amount = max(1, nano(worst_case_usd))
        ok = await self._reserve(keys=[key], args=[nano(budget), amount, nano(spent), _TTL_S])
        if not ok:
            raise BudgetReached(f"budget of ${budget} reached")
        return Reservation(key, amount)

    async def reserve_or_pause(self, batch_id: str, worst_case_usd: float) -> Reservation | None:
        """``reserve``, pausing the batch (``budget_reached``) and raising Halted when the
        call could take it past its budget."""
        try:
            return await self.reserve(batch_id, worst_case_usd)
        except BudgetReached as exc:
            await pause_batch(self.res, batch_id, "budget_reached")
            raise Halted("paused", str(exc)) from None

    async def settle(self, reservation: Reservation | None, cost_usd: float) -> None:
        """Replace the reservation by what the call really cost (0 when nothing was billed)."""
        if reservation is None:
            return
        async with self.res.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(reservation.key, "reserved", -reservation.amount)
            pipe.hincrby(reservation.key, "spent", nano(cost_usd))
            await pipe.execute()
