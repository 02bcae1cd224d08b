"""Receiving an uploaded list: streamed into PostgreSQL in 1 MiB parts (ingest reads them
back), never held whole in memory, refused as early as possible. (A form may name the
list's URL in ``list_url`` instead; ingest reads it from there, see batches.py.)

* A ``Content-Length`` over the limit is refused before a byte of the body is read (and,
  with ``Expect: 100-continue``, before the client sends it); a body that grows past the
  limit while streaming (chunked uploads) is cut off at the limit. Both answer 413.
* The first 64 KiB are checked before anything else is stored: a binary file (an image, a
  spreadsheet) is 415, an empty or unreadable list 400, each with a one-line reason.
* Rows are validated by ingest as it reads the list; invalid ones land in ``rejects``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from imagestream.common import ledger
from imagestream.common.inputs import InputError, ListParser

from .errors import ApiError, bad_request, error_response

#: Room for the multipart framing and text fields around the file itself.
FORM_OVERHEAD = 64 * 1024
PART_BYTES = 1024 * 1024
HEAD_BYTES = 64 * 1024
MAX_PARTS = 20
MAX_FIELD_BYTES = 4096
#: Longest list name kept (the uploaded file's, or the end of its URL).
MAX_NAME = 200


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"upload larger than the limit of {_size(limit)} ({limit} bytes)")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} GiB"


def check_declared_size(request: web.Request, limit: int) -> None:
    """Refuse a declared body over the limit before reading it."""
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD:
        raise too_large(limit)


def expect_handler(limit: int) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """``Expect: 100-continue``: answer 413 instead of inviting the body when it is too big."""

    async def handle(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(
                417, "only 'Expect: 100-continue' is understood", "expectation_failed"
            )
        try:
            check_declared_size(request, limit)
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    return handle


@dataclass
class Upload:
    source_name: str = "upload"
    bytes: int = 0
    format: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


async def receive(
    request: web.Request, conn: asyncpg.Connection, batch_id: uuid.UUID, limit: int
) -> Upload:
    """Read the multipart form: store its ``file`` part, return it and the text fields."""
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError(
            415, "send multipart/form-data with a 'file' part or a 'list_url' (and batch_name)"
        )
    try:
        return await _receive(await request.multipart(), conn, batch_id, limit)
    except _MALFORMED as exc:
        raise bad_request(
            f"unreadable multipart form ({str(exc).strip() or 'malformed'})"
        ) from None


#: What aiohttp raises on a malformed form (bad part headers, a missing boundary...).
_MALFORMED = (HttpProcessingError, ValueError, AssertionError, RuntimeError)


async def _receive(
    reader: MultipartReader, conn: asyncpg.Connection, batch_id: uuid.UUID, limit: int
) -> Upload:
    upload = Upload()
    got_file = False
    for _ in range(MAX_PARTS):
        part = await _next_part(reader)
        if part is None:
            break
        if part.name == "file":
            if got_file:
                raise bad_request("send one 'file' per batch")
            got_file = True
            upload.source_name = (part.filename or "upload")[:MAX_NAME]
            await _store(conn, batch_id, part, upload, limit)
        elif part.name:
            upload.fields[part.name] = await _text(part)
    else:
        raise bad_request(f"too many form parts (at most {MAX_PARTS})")
    if got_file and "list_url" in upload.fields:
        raise bad_request("send a 'file' or a 'list_url', not both")
    if not got_file and "list_url" not in upload.fields:
        raise bad_request("the form has no 'file' part (or 'list_url' field)")
    return upload


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    part = await reader.next()
    if part is None or isinstance(part, BodyPartReader):
        return part
    # A nested multipart: not something a browser or curl sends for a form.
    raise bad_request("nested multipart parts are not supported")


async def _text(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise bad_request(f"form field {part.name!r} is too long")
    return bytes(data).decode("utf-8", "replace")


async def _store(
    conn: asyncpg.Connection, batch_id: uuid.UUID, part: BodyPartReader, upload: Upload, limit: int
) -> None:
    parser = ListParser(filename=upload.source_name)
    buffer = bytearray()
    index = 0
    checked = False
    while chunk := await part.read_chunk(256 * 1024):
        upload.bytes += len(chunk)
        if upload.bytes > limit:
            raise too_large(limit)
        buffer += chunk
        if not checked and len(buffer) >= HEAD_BYTES:
            upload.format = _check_head(parser, bytes(buffer), whole=False)
            checked = True
        if len(buffer) >= PART_BYTES:
            await ledger.store_upload_part(conn, batch_id, index, bytes(buffer))
            index += 1
            buffer.clear()
    if not checked:
        upload.format = _check_head(parser, bytes(buffer), whole=True)
    if buffer:
        await ledger.store_upload_part(conn, batch_id, index, bytes(buffer))


def _check_head(parser: ListParser, head: bytes, *, whole: bool) -> str | None:
    """The list's format, from its first bytes; 415/400 if it cannot be a list."""
    if head.startswith(b"PK\x03\x04"):
        raise ApiError(415, "this is a zip or Excel file: save the list as CSV, TXT or JSONL")
    try:
        parser.feed(head)
        if whole:
            parser.close()
    except InputError as exc:
        status = 415 if "binary" in str(exc) else 400
        raise ApiError(status, f"cannot read the list: {exc}") from None
    return parser.format
