"""Where the CLI writes results (``analyze -o``, ``export -o``): a file, a folder, or an
object-storage URL (``s3://bucket/results.parquet``) or prefix (``s3://bucket/out/``).

A named file's format comes from its extension; a folder or prefix gets a file named
after the batch, ``<batch id><suffix>``, in ``--format`` (default CSV).
"""

from __future__ import annotations

import os

from imagestream.common import export, storage
from imagestream.common.storage import StorageError


def _names_a_file(output: str) -> bool:
    location = storage.parse(output)
    return not location.is_prefix and not (
        location.scheme == "file" and os.path.isdir(location.key)
    )


def results_sink(output: str, fmt: str | None) -> export.Sink:
    """The format of the results written to ``output``; StorageError when it is unclear or
    contradicts ``fmt``."""
    named = _names_a_file(output)
    by_name = export.sink_for_path(storage.parse(output).key) if named else None
    if fmt is not None:
        sink = export.SINKS[fmt]
        if by_name is not None and by_name is not sink:
            raise StorageError(f"{output} names a {by_name.name} file, not {fmt}", "invalid")
        return sink
    if not named:
        return export.SINKS[export.DEFAULT_FORMAT]
    if by_name is None:
        raise StorageError(
            f"cannot tell the export format of {output}: use {export.suffixes()} or --format",
            "invalid",
        )
    return by_name


def results_url(output: str, batch_id: str, sink: export.Sink) -> str:
    """The URL the results go to: ``output``, or a file named after the batch inside it."""
    return storage.resolve_name(output, f"{batch_id}{sink.suffix}")
