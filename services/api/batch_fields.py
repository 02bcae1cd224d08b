"""The text fields of a batch upload, checked: the one place that decides a new batch's
settings (name, analyzer, profile, model, budget). A bad field is a 400 naming it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagestream.common import profiles, providers

from .errors import bad_request

#: The form's text fields (besides ``file``); ``name`` is an alias of ``batch_name``.
FIELDS = (
    "batch_name", "name", "analyzer", "profile", "model", "budget_usd", "cache", "long_side",
    "mode",
)  # fmt: skip
MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class BatchFields:
    name: str
    analyzer: str
    profile: str | None = None
    model: str | None = None
    budget_usd: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


def batch_fields(
    form: Mapping[str, str], *, source_name: str, default_analyzer: str
) -> BatchFields:
    """The batch's settings from the form, or ApiError(400) with the reason."""
    unknown = sorted(set(form) - set(FIELDS))
    if unknown:
        raise bad_request(
            f"unknown form field(s) {', '.join(unknown)}; send file plus any of {', '.join(FIELDS)}"
        )
    for name, value in form.items():
        if len(value) > MAX_TEXT:
            raise bad_request(f"{name} is longer than {MAX_TEXT} characters")
    name = (form.get("batch_name") or form.get("name") or "").strip() or source_name
    try:  # analyzer, profile, model, budget_usd, cache, mode: checked where profiles live
        choice = providers.resolve_batch(form, default_analyzer=default_analyzer)
    except profiles.ProfileError as exc:
        raise bad_request(str(exc)) from None
    return BatchFields(
        name=name[:MAX_TEXT] or "upload",
        analyzer=choice.analyzer,
        profile=choice.profile,
        model=choice.model,
        budget_usd=choice.budget_usd,
        options=choice.options,
    )
