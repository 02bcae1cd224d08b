"""Writing an export to a destination URL (storage.py: s3://, gs://, file:// or a path):
one file, or part files ``part-00000<suffix>``, ... under a prefix (a URL ending in "/").
A format that can (a ``PartedSink``: Parquet) starts a new part every ``part_rows`` rows;
the others write one part.
Each file appears whole or not at all, and so does the export: when a part fails, the
parts finished before it are removed. An export interrupted (cancelled: its process
stopping, or its job taken over by another process) leaves its finished parts to the run
that starts it again, which writes the same names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

from .. import storage
from .sinks import PartedSink, Sink
from .source import Selection

log = logging.getLogger(__name__)
#: Rows per Parquet part file under a prefix, unless told otherwise.
DEFAULT_PART_ROWS = 1_000_000


@dataclass
class Written:
    """What a write has produced so far (readable while it runs)."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0


async def _parts(
    sink: Sink, selection: Selection, prefix: bool, part_rows: int
) -> AsyncGenerator[tuple[int, bytes]]:
    """(file number, piece), the pieces of a file in order and file n+1 after file n."""
    if prefix and isinstance(sink, PartedSink):
        async with contextlib.aclosing(sink.write_parts(selection, part_rows)) as numbered:
            async for item in numbered:
                yield item
        return
    async with contextlib.aclosing(sink.write(selection)) as single:
        async for piece in single:
            yield 0, piece


async def write_to(
    selection: Selection,
    sink: Sink,
    destination: str,
    written: Written,
    part_rows: int = DEFAULT_PART_ROWS,
) -> None:
    """Write the export of ``selection`` in ``sink``'s format to ``destination``;
    ``written`` tells what was written (StorageError or a database error on failure)."""
    location = storage.parse(destination)
    prefix = location.is_prefix
    if prefix and location.scheme == "file":
        await asyncio.to_thread(Path(location.key).mkdir, parents=True, exist_ok=True)
    part: contextlib.AsyncExitStack | None = None
    writer: storage.Writer | None = None
    finished = 0  # files of written.files complete in the destination
    pieces = _parts(sink, selection, prefix, part_rows)
    try:
        async with contextlib.aclosing(pieces):
            async for number, piece in pieces:
                if writer is None or number == len(written.files):
                    if part is not None:
                        await part.aclose()  # the previous file is complete
                        finished += 1
                    url = (
                        storage.join(destination, f"part-{number:05d}{sink.suffix}")
                        if prefix
                        else destination
                    )
                    part = contextlib.AsyncExitStack()
                    writer = await part.enter_async_context(storage.open_write(url))
                    written.files.append(url)
                await writer.write(piece)
                written.bytes += len(piece)
        if part is not None:
            await part.aclose()
            part = None
    except BaseException as exc:
        if part is not None:  # the file being written is dropped
            await part.__aexit__(type(exc), exc, exc.__traceback__)
        if isinstance(exc, Exception):
            await _remove(written.files[:finished])
        raise


async def _remove(urls: list[str]) -> None:
    """Remove the finished files of a failed export (the failure is what the caller
    reports; a file that cannot be removed is logged)."""
    for url in urls:
        try:
            await storage.delete(url)
        except storage.StorageError as exc:
            log.warning("a finished part of a failed export stays: %s", exc)
