"""The export formats: one ``Sink`` per format, each in its own module of ``formats/``
(a module's ``SINKS``), found here. The API's ``format`` parameter, the CLI's file
extensions and the OpenAPI document all read ``SINKS``: a new format is one new file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

from . import formats
from .source import Selection


class Sink(Protocol):
    @property
    def name(self) -> str:
        """The format's name: the API's ``format`` value."""
        ...

    @property
    def media_type(self) -> str: ...

    @property
    def suffix(self) -> str:
        """File name ending, with its dot (``.csv``)."""
        ...

    @property
    def openapi_schema(self) -> dict[str, Any]:
        """The OpenAPI schema of a response body in this format."""
        ...

    def write(self, selection: Selection) -> AsyncGenerator[bytes]:
        """The file in pieces, in constant memory whatever the number of rows; closing
        the iterator early stops the reading and releases its connection."""
        ...


@runtime_checkable
class PartedSink(Sink, Protocol):
    """A format that can split one export into files of a number of rows each."""

    def write_parts(
        self, selection: Selection, part_rows: int
    ) -> AsyncGenerator[tuple[int, bytes]]:
        """(file number, piece): a file's pieces in order, file n+1 after file n."""
        ...


def _discover() -> dict[str, Sink]:
    found: dict[str, Sink] = {}
    for info in sorted(pkgutil.iter_modules(formats.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{formats.__name__}.{info.name}")
        for sink in module.SINKS:
            found[sink.name] = sink
    return found


SINKS: dict[str, Sink] = _discover()
FORMATS: tuple[str, ...] = tuple(SINKS)
DEFAULT_FORMAT = "csv"


def sink_for_path(path: str) -> Sink | None:
    """The format a file name's extension names (``results.xlsx``), if any."""
    lowered = path.lower()
    matching = [s for s in SINKS.values() if lowered.endswith(s.suffix)]
    return max(matching, key=lambda s: len(s.suffix), default=None)


def suffixes() -> str:
    """The known extensions, for messages: ``.csv, .json, ...``."""
    return ", ".join(s.suffix for s in SINKS.values())
