"""Object storage by URL: streamed writes (exports) and reads (lists, images).

URLs: ``s3://bucket/key``, ``gs://bucket/key``, ``file:///abs/path`` or a plain path; for
reading also ``https://`` (and ``http://``), through the address guard (``guard.py``).

The client is obstore (Rust ``object_store``), chosen by measurement against fsspec/s3fs
(``bench/storage.py``, ``bench/RESULTS.md``): on the same moto S3 server it used 4-7x less
client CPU for multipart writes and for many small GETs (images), about half for a
streamed read, and less memory; on a 2-core machine that also decodes images, CPU is what
runs out. It is natively async for writes too (s3fs writes only from a thread).

Credentials and endpoints come from each SDK's ordinary environment, read by the store
when it is made: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, R2, moto);
``GOOGLE_APPLICATION_CREDENTIALS`` (or ``GOOGLE_SERVICE_ACCOUNT*``) for GCS. Nothing here
keeps, returns or logs them, and error messages are built from the URL and the kind of
failure, not from the client's debug text.

Writes are all-or-nothing: an object (or file) appears only when the ``open_write`` block
exits cleanly. S3/GCS: small objects are one PUT on close, larger ones a multipart upload
that is aborted on error; files: written beside the target as ``.partial``, renamed at the
end. A failure while writing is a one-line StorageError, like one at open or close.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import obstore
from obstore.exceptions import (
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import GCSStore, S3Store
from yarl import URL

from . import guard
from .guard import AddressPolicy

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import ClientConfig, RetryConfig

log = logging.getLogger(__name__)

Scheme = Literal["s3", "gs", "file"]
Failure = Literal["invalid", "not_found", "denied", "blocked", "too_large", "failed"]

#: Pieces buffered before a multipart part goes out (S3's minimum part is 5 MiB), and
#: parts in flight at once: together they bound a writer's memory (~32 MiB).
PART_BYTES = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 4
#: Pieces of a streamed read, and the bytes one GET of it covers (see ``read_chunks``).
READ_BYTES = 1024 * 1024
SEGMENT_BYTES = 64 * 1024 * 1024
#: Redirects followed when reading a web URL (each hop checked by the address guard).
HTTP_REDIRECTS = 5

# S3 (and GCS) bucket names: 3-63 lower-case letters, digits, dots, hyphens (GCS also
# underscores), starting and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


#: Key characters left as they are in a URL (the rest is percent-encoded, as ``parse``
#: decodes it).
_KEY_SAFE = "/!$&'()*+,;=:@-._~"


class StorageError(Exception):
    """A storage operation failed; ``str()`` is one line for the user, ``failure`` its kind."""

    def __init__(self, message: str, failure: Failure = "failed") -> None:
        super().__init__(message)
        self.failure: Failure = failure


@dataclass(frozen=True, slots=True)
class Location:
    scheme: Scheme
    #: The bucket (s3, gs); empty for files.
    bucket: str
    #: The object key (s3, gs) or the absolute path (file); ends with "/" for a prefix.
    key: str

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return "file://" + quote(self.key)
        return f"{self.scheme}://{self.bucket}/{quote(self.key, safe=_KEY_SAFE)}"

    @property
    def is_prefix(self) -> bool:
        return self.key.endswith("/") or self.key == ""

    def __str__(self) -> str:
        return self.url


def parse(url: str) -> Location:
    """The location ``url`` names, or StorageError (failure ``invalid``) saying why not."""
    text = url.strip()
    if "://" not in text:
        if not text:
            raise StorageError("empty destination", "invalid")
        path = os.path.abspath(os.path.expanduser(text))
        return Location("file", "", path + "/" if text.endswith("/") else path)
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise StorageError(f"unparsable URL {text!r} ({exc})", "invalid") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{text}: a file URL names no host (file:///path)", "invalid")
        return Location("file", "", unquote(parts.path) or "/")
    if scheme not in ("s3", "gs"):
        raise StorageError(
            f"{text}: scheme {scheme!r} is not supported (s3://, gs://, file:// or a path)",
            "invalid",
        )
    if "@" in parts.netloc:
        raise StorageError(
            f"{scheme}:// URLs carry no credentials: they come from the environment", "invalid"
        )
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(f"{scheme}://{bucket}: not a valid bucket name", "invalid")
    if parts.query or parts.fragment:
        raise StorageError(f"{text}: a storage URL has no query or fragment", "invalid")
    return Location(scheme, bucket, unquote(parts.path).lstrip("/"))  # type: ignore[arg-type]


def join(url: str, name: str) -> str:
    """``name`` inside the prefix (or folder) ``url``: ``s3://b/out/`` + ``x.csv``."""
    location = parse(url)
    key = location.key if location.is_prefix else location.key + "/"
    if "://" not in url:  # a path stays a path
        return key + name
    return Location(location.scheme, location.bucket, key + name).url


def resolve_name(url: str, name: str) -> str:
    """``url`` itself, or ``name`` inside it when it is a prefix (``s3://b/out/``) or an
    existing local folder."""
    location = parse(url)
    if location.is_prefix or (location.scheme == "file" and os.path.isdir(location.key)):
        return join(url, name)
    return url


async def check_destination(url: str) -> None:
    """StorageError now, rather than after a long run, if ``url`` certainly cannot be
    written: its folder or bucket does not exist. (Permissions show only on writing.)"""
    location = parse(url)
    if location.scheme == "file":
        folder = location.key if location.is_prefix else os.path.dirname(location.key)
        if not await asyncio.to_thread(os.path.isdir, folder):
            raise StorageError(f"folder {folder} does not exist", "invalid")
        return
    prefix = location.key if location.is_prefix else location.key.rpartition("/")[0]
    try:
        await obstore.list_with_delimiter_async(_store(location), prefix or None)
    except Exception as exc:
        failure = _failure(location, exc)
        if failure.failure == "not_found":
            raise StorageError(
                f"bucket {location.scheme}://{location.bucket} does not exist", "not_found"
            ) from None
        if failure.failure != "denied":  # listing may be denied where writing is allowed
            raise failure from None


# ---------------------------------------------------------------- stores
_stores: dict[tuple[str, str, str | None], Any] = {}


def _store(location: Location) -> Any:
    """One store per bucket (and endpoint), reused: it holds the connection pool."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if location.scheme == "s3" else None
    cache_key = (location.scheme, location.bucket, endpoint)
    store = _stores.get(cache_key)
    if store is None:
        if not _stores:
            atexit.register(_let_client_threads_settle)
        client_options: ClientConfig = {
            "connect_timeout": timedelta(seconds=10),
            "timeout": timedelta(seconds=120),
        }
        # A local S3-compatible server (MinIO, moto) is often plain HTTP.
        if endpoint and endpoint.lower().startswith("http://"):
            client_options["allow_http"] = True
        retry: RetryConfig = {"max_retries": 3, "retry_timeout": timedelta(seconds=60)}
        if location.scheme == "s3":
            store = S3Store(location.bucket, client_options=client_options, retry_config=retry)
        else:
            store = GCSStore(location.bucket, client_options=client_options, retry_config=retry)
        _stores[cache_key] = store
    return store


def _let_client_threads_settle() -> None:
    """At exit, a moment for obstore's Rust threads to finish the Python calls of the last
    operation. Without it, a process that exits right after one (asyncio.run, then exit)
    aborted with SIGABRT in 13 of 80 runs, inside interpreter shutdown, its work done;
    with this hook 0 of 80 (pyo3-async-runtimes' runtime is never shut down)."""
    time.sleep(0.01)


def _failure(location: Location, exc: Exception) -> StorageError:
    """A one-line StorageError for a client exception (never the client's debug text)."""
    if isinstance(exc, PreconditionError):
        return StorageError(f"{location}: the object changed while it was read", "failed")
    if isinstance(exc, NotFoundError | FileNotFoundError):
        return StorageError(f"{location}: not found", "not_found")
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError | PermissionError):
        return StorageError(f"{location}: access denied", "denied")
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return StorageError(f"{location}: not a file", "invalid")
    if isinstance(exc, OSError) and exc.strerror:
        return StorageError(f"{location}: {exc.strerror}", "failed")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    # Some answers reach us only as a generic error (a listing of a missing bucket).
    if " 404 Not Found" in first:
        return StorageError(f"{location}: not found", "not_found")
    if " 403 Forbidden" in first:
        return StorageError(f"{location}: access denied", "denied")
    # obstore's first line is "<what> ... Error performing GET http://... - <status>"; the
    # status line is what tells the user something, the endpoint and timings are noise.
    return StorageError(f"{location}: {_one_line(first.rsplit(' - ', 1)[-1])}", "failed")


# ---------------------------------------------------------------- writing
class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


class _ObjectWriter:
    def __init__(self, handle: Any, location: Location) -> None:
        self._handle = handle
        self._location = location

    async def write(self, data: bytes) -> None:
        # A part goes out while writing: its failure (the bucket gone, the endpoint down)
        # is the user's one line, like a failure at open or close.
        try:
            await self._handle.write(data)
        except Exception as exc:
            raise _failure(self._location, exc) from None


class _FileWriter:
    def __init__(self, handle: Any, location: Location) -> None:
        self._handle = handle
        self._location = location

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._handle.write, data)
        except OSError as exc:  # a full disk, a removed folder
            raise _failure(self._location, exc) from None


@asynccontextmanager
async def open_write(url: str) -> AsyncIterator[Writer]:
    """A destination for streamed writing; the object appears only on a clean exit."""
    location = parse(url)
    if location.is_prefix:
        raise StorageError(f"{location} is a folder or prefix: name the file", "invalid")
    if location.scheme == "file":
        async with _open_file_write(location) as writer:
            yield writer
        return
    try:
        handle = obstore.open_writer_async(
            _store(location),
            location.key,
            buffer_size=PART_BYTES,
            max_concurrency=PARTS_IN_FLIGHT,
        )
        await handle.__aenter__()
    except Exception as exc:
        raise _failure(location, exc) from None
    try:
        yield _ObjectWriter(handle, location)
    except BaseException as exc:
        # obstore aborts the multipart upload when the block exits with an error. The
        # abort fails too when the store is what failed: the first error is the one to tell.
        try:
            await handle.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception as abort:
            log.warning("could not abort the upload: %s", _failure(location, abort))
        raise
    try:
        await handle.__aexit__(None, None, None)
    except Exception as exc:
        raise _failure(location, exc) from None


async def delete(url: str) -> None:
    """Remove the object or file at ``url``; nothing to do if it is not there."""
    location = parse(url)
    try:
        if location.scheme == "file":
            await asyncio.to_thread(Path(location.key).unlink, missing_ok=True)
        else:
            await obstore.delete_async(_store(location), location.key)
    except Exception as exc:
        raise _failure(location, exc) from None


@asynccontextmanager
async def _open_file_write(location: Location) -> AsyncIterator[Writer]:
    path = Path(location.key)
    if not path.parent.is_dir():
        raise StorageError(f"folder {path.parent} does not exist", "invalid")
    partial = path.with_name(path.name + ".partial")
    try:
        handle = await asyncio.to_thread(partial.open, "wb")
    except OSError as exc:
        raise _failure(location, exc) from None
    try:
        yield _FileWriter(handle, location)
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(partial.replace, path)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, and may fail as the write did
            handle.close()
        partial.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- reading
async def read_chunks(
    url: str, chunk_bytes: int = READ_BYTES, *, policy: AddressPolicy | None = None
) -> AsyncIterator[bytes]:
    """The bytes of the object, file or web page at ``url``, in pieces (of about
    ``chunk_bytes``). An http(s) URL is fetched through the address guard: only public
    addresses, unless ``policy`` allows more; every redirect is checked again."""
    if url.lower().startswith(("http://", "https://")):
        async for piece in _read_http(url, chunk_bytes, policy or AddressPolicy()):
            yield piece
        return
    location = parse(url)
    if location.is_prefix:
        raise StorageError(f"{location} is a folder or prefix, not a file", "invalid")
    if location.scheme == "file":
        async for piece in _read_file(location, chunk_bytes):
            yield piece
        return
    store = _store(location)
    try:
        meta = await obstore.head_async(store, location.key)
    except Exception as exc:
        raise _failure(location, exc) from None
    offset, size = 0, meta["size"]
    # Each segment is one GET streamed in pieces: few requests (fast), none held open for
    # long by a slow consumer; a failed one resumes at the offset reached. If-Match: an
    # object replaced while it is read fails instead of yielding a mix of two lists.
    options: GetOptions = {"if_match": meta["e_tag"]} if meta["e_tag"] else {}
    failures = 0
    while offset < size:
        segment = (offset, min(offset + SEGMENT_BYTES, size))
        try:
            result = await obstore.get_async(
                store, location.key, options={**options, "range": segment}
            )
            pieces = aiter(result.stream(min_chunk_size=chunk_bytes))
            while offset < segment[1]:
                piece = await anext(pieces)
                offset += len(piece)
                failures = 0
                yield piece
        except (StopAsyncIteration, Exception) as exc:
            failures += 1
            if failures >= 3 or isinstance(exc, NotFoundError | PreconditionError):
                raise _failure(location, exc) from None
            log.warning("reading %s failed at byte %d; resuming there", location, offset)


async def _read_file(location: Location, chunk_bytes: int) -> AsyncIterator[bytes]:
    try:
        handle = await asyncio.to_thread(Path(location.key).open, "rb")
    except OSError as exc:
        raise _failure(location, exc) from None
    try:
        while piece := await asyncio.to_thread(handle.read, chunk_bytes):
            yield piece
    finally:
        handle.close()


def _shown(url: URL) -> str:
    """A web URL fit for messages and logs: no user info, query or fragment (a signed
    URL's query is a credential)."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def shown_url(url: str) -> str:
    """``url`` fit for messages, logs and api answers (see ``_shown``)."""
    try:
        return _shown(URL(url, encoded=True))
    except ValueError:
        return "(unparsable URL)"


def file_name(url: str) -> str:
    """The last segment of a URL's path (a list's extension tells its format)."""
    return unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])


def check_source(
    url: str, *, allowed_buckets: frozenset[tuple[str, str]] | None, policy: AddressPolicy
) -> None:
    """StorageError unless ``read_chunks`` may read ``url`` for a caller: an s3:// or gs://
    object in ``allowed_buckets`` (None: any bucket), or a web URL whose host passes the
    address guard by syntax (what it resolves to is checked when it is read)."""
    if url.lower().startswith(("http://", "https://")):
        try:
            guard.check_url(URL(url, encoded=True), policy)
        except ValueError as exc:
            raise StorageError(f"unparsable URL ({exc})", "invalid") from None
        except guard.BlockedAddressError as exc:
            raise StorageError(f"{shown_url(url)}: {exc}", "blocked") from None
        return
    location = parse(url)
    if location.scheme == "file":
        raise StorageError("a list URL is s3://, gs:// or https://", "invalid")
    if location.is_prefix:
        raise StorageError(f"{location} is a prefix, not an object", "invalid")
    if allowed_buckets is not None and not bucket_allowed(location, allowed_buckets):
        raise StorageError(
            f"bucket {location.scheme}://{location.bucket} is not in LIST_ALLOWED_BUCKETS",
            "denied",
        )


async def _read_http(url: str, chunk_bytes: int, policy: AddressPolicy) -> AsyncIterator[bytes]:
    current = URL(url, encoded=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(
        connector=guard.guarded_connector(policy),
        timeout=timeout,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "imagestream (list reader)"},
    ) as http:
        for _ in range(HTTP_REDIRECTS + 1):
            try:
                guard.check_url(current, policy)
                async with http.get(current, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in (301, 302, 303, 307, 308) and location:
                        current = current.join(URL(location, encoded=True))
                        continue
                    _check_http_status(current, response.status)
                    async for piece in response.content.iter_chunked(chunk_bytes):
                        yield piece
                    return
            except (aiohttp.ClientError, OSError) as exc:
                blocked = guard.blocked_cause(exc)
                if blocked is not None:
                    raise StorageError(f"{_shown(current)}: {blocked}", "blocked") from None
                raise StorageError(
                    f"{_shown(current)}: {_one_line(str(exc)) or type(exc).__name__}"
                ) from None
        raise StorageError(f"{_shown(current)}: more than {HTTP_REDIRECTS} redirects")


def _check_http_status(url: URL, status: int) -> None:
    if 200 <= status < 300:
        return
    failure: Failure = "failed"
    if status in (404, 410):
        failure = "not_found"
    elif status in (401, 403):
        failure = "denied"
    raise StorageError(f"{_shown(url)}: HTTP {status}", failure)


def _one_line(text: str) -> str:
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= 160 else first[:157] + "..."


async def read_capped(url: str, max_bytes: int) -> bytes:
    """The whole object at ``url`` (one GET), or StorageError ``too_large`` past
    ``max_bytes`` (refused from the object's size before its body is read)."""
    location = parse(url)
    if location.scheme == "file" or location.is_prefix:
        raise StorageError(f"{location}: not an object URL", "invalid")
    try:
        result = await obstore.get_async(_store(location), location.key)
        size = result.meta["size"]
        if size > max_bytes:
            raise StorageError(f"{size} bytes, the limit is {max_bytes}", "too_large")
        body = (await result.bytes_async()).to_bytes()
    except StorageError:
        raise
    except Exception as exc:
        raise _failure(location, exc) from None
    return body


# ---------------------------------------------------------------- allow-lists
def parse_buckets(values: Iterable[str]) -> frozenset[tuple[str, str]]:
    """``s3://name`` / ``gs://name`` entries as (scheme, bucket); ValueError if malformed."""
    buckets = set()
    for raw in values:
        entry = raw.strip().rstrip("/")
        if not entry:
            continue
        location = _parse_bucket(entry)
        buckets.add((location.scheme, location.bucket))
    return frozenset(buckets)


def _parse_bucket(entry: str) -> Location:
    try:
        location = parse(entry)
    except StorageError as exc:
        raise ValueError(str(exc)) from None
    if location.scheme == "file" or location.key:
        raise ValueError(f"{entry!r} is not a bucket (write s3://name or gs://name)")
    return location


def bucket_allowed(location: Location, allowed: frozenset[tuple[str, str]]) -> bool:
    return (location.scheme, location.bucket) in allowed
