"""Building a stage's ItemResult for the writer: the one place an outcome is made (and
counted)."""

from __future__ import annotations

from typing import Any

from . import messages
from .errors import ItemError
from .keys import Keys
from .metrics import ITEM_OUTCOMES
from .worker import Out, out


def item_result(
    keys: Keys,
    stage: str,
    item: messages.FetchTask | messages.AnalyzeTask | messages.ItemResult,
    status: messages.ItemStatus,
    error: ItemError | None = None,
    *,
    usage: messages.Usage | None = None,
) -> Out:
    """The item's outcome, bound for the write stream, counted in the stage's metrics."""
    ITEM_OUTCOMES.labels(stage, status, error.error_class if error else "").inc()
    return out(
        keys.write,
        messages.ItemResult(
            batch_id=item.batch_id,
            item_id=item.item_id,
            status=status,
            stage=stage,
            error_class=error.error_class.value if error else None,
            error_message=error.message if error else None,
            usage=usage,
        ),
    )


def analysis_result(
    keys: Keys,
    task: messages.AnalyzeTask,
    *,
    analyzer: str,
    model: str | None,
    analysis: dict[str, Any],
    usage: messages.Usage | None,
    cache_hit: bool = False,
) -> Out:
    """The item's analysis, bound for the write stream, counted as the analyzer's success."""
    ITEM_OUTCOMES.labels("analyzer", "succeeded", "").inc()
    return out(
        keys.write,
        messages.ItemResult(
            batch_id=task.batch_id,
            item_id=task.item_id,
            status="succeeded",
            stage="analyzer",
            facts=task.facts,
            analyzer=analyzer,
            model=model,
            analysis=analysis,
            usage=usage,
            cache_hit=cache_hit,
        ),
    )
