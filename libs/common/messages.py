"""The message of every stream, as frozen msgspec Structs, and their codecs.

Each stream carries one tagged union; the tag makes a misrouted or foreign entry a clear
decode error (dead-lettered) instead of a silent misread. ``v`` is the schema version:
additive changes keep it, a breaking change bumps it and the decoder learns both.
Encoders and decoders are built once here and reused for every message.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1


class Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", omit_defaults=True):
    v: int = SCHEMA_VERSION


class BatchSubmitted(Base, tag="batch", frozen=True, kw_only=True):
    """api -> ingest: a batch whose uploaded list is stored and waits to be read."""

    batch_id: str


class FetchTask(Base, tag="fetch", frozen=True, kw_only=True):
    """ingest -> fetcher: download one item's URL."""

    batch_id: str
    item_id: int
    url: str


class ExifSummary(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    camera: str | None = None
    taken_at: str | None = None
    orientation: int | None = None
    has_gps: bool = False


class ImageFacts(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the fetcher learns from the original bytes; reported as-is in results."""

    width: int
    height: int
    format: str
    mode: str
    bytes: int
    sha256: str
    frames: int = 1
    exif: ExifSummary | None = None


class AnalyzeTask(Base, tag="analyze", frozen=True, kw_only=True):
    """fetcher -> analyzer: the image is in Redis under ``blob_key`` (downscaled)."""

    batch_id: str
    item_id: int
    url: str
    facts: ImageFacts
    blob_key: str


class Usage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Tokens and cost of one analysis (zero for the local analyzer and cache hits)."""

    input_tokens: int = 0
    output_tokens: int = 0
    thought_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0


ItemStatus = Literal["succeeded", "failed", "skipped", "cancelled", "requeued"]


class ItemResult(Base, tag="result", frozen=True, kw_only=True):
    """fetcher/analyzer -> writer: the outcome of one item.

    ``requeued`` is not terminal: the item goes back to pending (its batch was paused
    while the item waited), so the writer stays the only stage that moves items.
    """

    batch_id: str
    item_id: int
    status: ItemStatus
    stage: str
    error_class: str | None = None
    error_message: str | None = None
    facts: ImageFacts | None = None
    analyzer: str | None = None
    model: str | None = None
    analysis: dict[str, Any] | None = None
    usage: Usage | None = None
    cache_hit: bool = False


class DeadLetter(Base, tag="dead", frozen=True, kw_only=True):
    """An entry a stage gave up on: the original payload with why and where."""

    stream: str
    entry_id: str
    stage: str
    deliveries: int
    reason: str
    payload: bytes


BatchMessage = BatchSubmitted
WorkMessage = FetchTask | AnalyzeTask | ItemResult


class BatchRef(msgspec.Struct, frozen=True):
    """The batch of any work message (its other fields are skipped when decoding)."""

    batch_id: str


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

batch_decoder: msgspec.msgpack.Decoder[BatchSubmitted] = msgspec.msgpack.Decoder(BatchSubmitted)
fetch_decoder: msgspec.msgpack.Decoder[FetchTask] = msgspec.msgpack.Decoder(FetchTask)
analyze_decoder: msgspec.msgpack.Decoder[AnalyzeTask] = msgspec.msgpack.Decoder(AnalyzeTask)
result_decoder: msgspec.msgpack.Decoder[ItemResult] = msgspec.msgpack.Decoder(ItemResult)
dead_decoder: msgspec.msgpack.Decoder[DeadLetter] = msgspec.msgpack.Decoder(DeadLetter)
batch_ref_decoder: msgspec.msgpack.Decoder[BatchRef] = msgspec.msgpack.Decoder(BatchRef)
