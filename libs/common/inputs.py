"""Reading uploaded URL lists: CSV, TXT and JSONL, plain or gzip, incrementally.

``ListParser`` is fed the bytes of a list in chunks of any size and returns the rows it
completed, so a list of any length is read in constant memory. It is plain synchronous
code: the ingest service runs ``feed`` in an executor (parsing is CPU work).

* CSV: a ``url`` column (any case), or URLs in the first column; other columns are kept
  as item metadata under their header names (``column_2``... without a header row).
* TXT: one URL per line.
* JSONL: one object per line with a ``url`` key; other keys are kept as metadata.

The format comes from the file name's extension, else from the first lines.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import orjson

from . import storage

Format = Literal["csv", "txt", "jsonl"]
MAX_URL_LENGTH = 4096
_SNIFF_BYTES = 64 * 1024
_URL_COLUMN_NAMES = ("url", "image_url", "image", "src", "link")


class InputError(ValueError):
    """The list as a whole cannot be read (one line, shown to the user)."""


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    url: str
    metadata: dict[str, Any] | None

    @property
    def url_hash(self) -> bytes:
        return hashlib.md5(self.url.encode(), usedforsecurity=False).digest()


@dataclass(frozen=True, slots=True)
class Reject:
    line: int
    reason: str
    raw: str


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
# Characters that ``quote`` would change: anything outside the unreserved and safe sets.
_NEEDS_QUOTING = re.compile(r"[^A-Za-z0-9/%:@!$&'()*+,;=\-._~]")
_NEEDS_QUOTING_QUERY = re.compile(r"[^A-Za-z0-9/%:@!$&'()*+,;=\-._~?]")


def normalize_url(raw: str, *, allow_file: bool = False) -> str:
    """The canonical form of an image URL, or ValueError with the reason.

    This runs once per input row (tens of millions for a big list), so the common case, an
    ASCII URL that needs no quoting, takes the fast paths.
    """
    text = raw.strip()
    if not text:
        raise ValueError("empty URL")
    if len(text) > MAX_URL_LENGTH:
        raise ValueError(f"URL longer than {MAX_URL_LENGTH} characters")
    if _CONTROL.search(text):
        raise ValueError("URL contains control characters")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"unparsable URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme == "file" and allow_file:
        return urlunsplit(("file", "", quote(parts.path, safe="/%"), "", ""))
    if scheme in ("s3", "gs"):
        return _object_url(text)
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme or 'missing'!r} is not http, https, s3 or gs")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad host or port ({exc})") from None
    if not host:
        raise ValueError("URL has no host")
    if ":" in host:
        hostname = f"[{host}]"
    elif host.isascii():
        hostname = host  # urlsplit already lower-cased it
    else:
        try:
            hostname = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise ValueError("host is not a valid domain name") from None
    if (
        port is not None
        and not (scheme == "http" and port == 80)
        and not (scheme == "https" and port == 443)
    ):
        hostname = f"{hostname}:{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{hostname}" if userinfo else hostname
    path = parts.path or "/"
    if _NEEDS_QUOTING.search(path):
        path = quote(path, safe=_PATH_SAFE)
    query = parts.query
    if _NEEDS_QUOTING_QUERY.search(query):
        query = quote(query, safe=_QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


def _object_url(text: str) -> str:
    """The canonical form of an s3:// or gs:// image URL (whether the fetcher may read its
    bucket is the fetcher's FETCH_ALLOWED_BUCKETS to say)."""
    try:
        location = storage.parse(text)
    except storage.StorageError as exc:
        raise ValueError(str(exc)) from None
    if location.is_prefix:
        raise ValueError("URL names a bucket or prefix, not an object")
    return location.url


def format_from_name(name: str | None) -> Format | None:
    lowered = (name or "").lower().removesuffix(".gz")
    if lowered.endswith((".csv", ".tsv")):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lowered.endswith((".txt", ".list")):
        return "txt"
    return None


def sniff_format(sample: str) -> Format:
    first = next((line.strip() for line in sample.splitlines() if line.strip()), "")
    if first.startswith("{"):
        return "jsonl"
    if any(name in _cells(first) for name in _URL_COLUMN_NAMES):
        return "csv"
    if ("," in first or "\t" in first or ";" in first) and not _looks_like_url(first):
        return "csv"
    if "\t" in first or (_looks_like_url(first.split(",")[0]) and "," in first):
        return "csv"
    return "txt"


def _cells(line: str) -> list[str]:
    try:
        row = next(csv.reader([line], _dialect_for(line)))
    except (csv.Error, StopIteration):
        return []
    return [c.strip().lower() for c in row]


def _dialect_for(sample: str) -> type[csv.Dialect]:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|")
    except csv.Error:
        return csv.excel


def _looks_like_url(text: str) -> bool:
    t = text.strip().lower()
    return t.startswith(("http://", "https://", "file://", "www.")) or "://" in t


@dataclass
class ListParser:
    """Incremental parser; ``feed`` returns completed rows and rejects."""

    filename: str | None = None
    allow_file: bool = False
    format: Format | None = None
    columns: list[str] = field(default_factory=list)
    _gunzip: Any = None
    _decoder: Any = None
    _started: bool = False
    _head: bytes = b""
    _text: str = ""
    _line: int = 0
    _dialect: type[csv.Dialect] = csv.excel
    _url_index: int = 0
    _header_seen: bool = False
    _seen_columns: dict[str, None] = field(default_factory=dict)

    def feed(self, data: bytes) -> list[Row | Reject]:
        if not self._started:
            self._head += data
            if len(self._head) < _SNIFF_BYTES:
                return []
            data, self._head = self._head, b""
            self._start(data)
        return self._consume(self._decode(data), final=False)

    def close(self) -> list[Row | Reject]:
        out: list[Row | Reject] = []
        if not self._started:
            data, self._head = self._head, b""
            self._start(data)
            out += self._consume(self._decode(data), final=False)
        tail = self._decoder.decode(self._gunzip.flush() if self._gunzip else b"", final=True)
        return out + self._consume(tail, final=True)

    # -------------------------------------------------------------- internals
    def _start(self, data: bytes) -> None:
        self._started = True
        if data[:2] == b"\x1f\x8b":
            self._gunzip = zlib.decompressobj(wbits=47)
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        head = (self._gunzip.decompress(data[:_SNIFF_BYTES]) if self._gunzip else data)[
            :_SNIFF_BYTES
        ]
        if self._gunzip:
            # Sniff from a separate decompressor so the stream one starts clean.
            self._gunzip = zlib.decompressobj(wbits=47)
        if b"\x00" in head:
            raise InputError("the file is binary, not a CSV, TXT or JSONL list")
        sample = head.decode("utf-8-sig", errors="replace")
        if not sample.strip():
            raise InputError("the file is empty")
        self.format = self.format or format_from_name(self.filename) or sniff_format(sample)
        if self.format == "csv":
            self._dialect = _dialect_for("\n".join(sample.splitlines()[:20]))

    def _decode(self, data: bytes) -> str:
        if self._gunzip:
            try:
                data = self._gunzip.decompress(data)
            except zlib.error as exc:
                raise InputError(f"the gzip data is corrupt ({exc})") from None
        text: str = self._decoder.decode(data)
        return text

    def _consume(self, text: str, *, final: bool) -> list[Row | Reject]:
        self._text += text
        if final:
            block, self._text = self._text, ""
        else:
            cut = self._record_boundary(self._text)
            if cut <= 0:
                return []
            block, self._text = self._text[:cut], self._text[cut:]
        if not block:
            return []
        if self.format == "csv":
            return self._csv(block)
        if self.format == "jsonl":
            return self._jsonl(block)
        return self._txt(block)

    def _record_boundary(self, text: str) -> int:
        """End of the last complete record (a CSV newline outside quotes)."""
        end = text.rfind("\n") + 1
        if self.format != "csv":
            return end
        parity = 0
        boundary = 0
        pos = 0
        for line in text[:end].splitlines(keepends=True):
            pos += len(line)
            parity ^= line.count('"') & 1
            if parity == 0:
                boundary = pos
        return boundary

    def _row(self, line: int, url: str, metadata: dict[str, Any] | None, raw: str) -> Row | Reject:
        try:
            return Row(line, normalize_url(url, allow_file=self.allow_file), metadata or None)
        except ValueError as exc:
            return Reject(line, str(exc), raw[:500])

    def _txt(self, block: str) -> list[Row | Reject]:
        out: list[Row | Reject] = []
        for raw in block.splitlines():
            self._line += 1
            if raw.strip() and not raw.lstrip().startswith("#"):
                out.append(self._row(self._line, raw, None, raw))
        return out

    def _jsonl(self, block: str) -> list[Row | Reject]:
        out: list[Row | Reject] = []
        for raw in block.splitlines():
            self._line += 1
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                out.append(Reject(self._line, f"not valid JSON ({exc})", raw[:500]))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("url"), str):
                out.append(Reject(self._line, 'no "url" string in this object', raw[:500]))
                continue
            url = obj.pop("url")
            for key in obj:
                self._seen_columns.setdefault(str(key), None)
            self.columns = list(self._seen_columns)
            out.append(self._row(self._line, url, obj, raw))
        return out

    def _csv(self, block: str) -> list[Row | Reject]:
        out: list[Row | Reject] = []
        reader = csv.reader(io.StringIO(block, newline=""), self._dialect)
        first_line = self._line
        try:
            for cells in reader:
                self._line = first_line + reader.line_num
                if not cells or not any(c.strip() for c in cells):
                    continue
                if not self._header_seen:
                    self._header_seen = True
                    if self._take_header(cells):
                        continue
                self._csv_row(cells, out)
        except csv.Error as exc:
            raise InputError(f"line {self._line + 1}: malformed CSV ({exc})") from None
        self._line = first_line + reader.line_num
        return out

    def _take_header(self, cells: list[str]) -> bool:
        """Use the first row as the header unless it already holds a URL."""
        lowered = [c.strip().lower() for c in cells]
        for name in _URL_COLUMN_NAMES:
            if name in lowered:
                self._url_index = lowered.index(name)
                break
        else:
            if _looks_like_url(cells[0]):
                self.columns = [f"column_{i + 1}" for i in range(1, len(cells))]
                return False
            self._url_index = 0
        names = [c.strip() or f"column_{i + 1}" for i, c in enumerate(cells)]
        self.columns = [n for i, n in enumerate(names) if i != self._url_index]
        return True

    def _csv_row(self, cells: list[str], out: list[Row | Reject]) -> None:
        raw = ",".join(cells)
        if self._url_index >= len(cells):
            out.append(Reject(self._line, "row has no URL column", raw[:500]))
            return
        url = cells[self._url_index]
        extra = [c for i, c in enumerate(cells) if i != self._url_index]
        if len(extra) > len(self.columns):
            self.columns += [f"column_{i + 2}" for i in range(len(self.columns), len(extra))]
        metadata = {name: value for name, value in zip(self.columns, extra, strict=False)}
        out.append(self._row(self._line, url, metadata, raw))
