"""Downloading one image: the guard on every hop, politeness, timeouts, a byte cap
enforced while streaming, an early content check, retries, and the mapping of every
failure to an error class.

One ``aiohttp.ClientSession`` per process: its connector keeps connections alive and
pooled per host and caches DNS answers (already filtered by the guard). Redirects are
followed here, not by aiohttp, so that each hop's URL is checked before it is requested.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp
from prometheus_client import Counter, Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_exponential_jitter
from yarl import URL

from imagestream.common.errors import ErrorClass, ItemError
from imagestream.common.guard import (
    AddressPolicy,
    BlockedAddressError,
    blocked_cause,
    check_url,
    guarded_connector,
    parse_cidrs,
)

from .politeness import HostGates, opts_out, retry_after_s
from .settings import FetcherSettings

FETCH_SECONDS = Histogram(
    "imagestream_fetch_duration_seconds",
    "Time to download one image, retries and host waits included.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
FETCH_BYTES = Counter("imagestream_fetch_bytes_total", "Bytes of images downloaded.")
RETRIES = Counter(
    "imagestream_fetch_retries_total", "Download attempts retried, by error class.", ["error_class"]
)
RESPONSES = Counter(
    "imagestream_fetch_responses_total",
    "HTTP responses received (every redirect hop and retry), by status class (2xx...5xx).",
    ["status_class"],
)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Codes after which a host is given a pause (it says it is overloaded or rate-limiting us).
_SLOW_DOWN = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Downloaded:
    body: bytes
    #: The URL the body came from (after redirects).
    url: str


class Downloader:
    def __init__(
        self,
        settings: FetcherSettings,
        *,
        check_head: Callable[[bytes], None],
        head_bytes: int,
    ) -> None:
        """``check_head(first_bytes)`` raises ItemError for content that is certainly not
        an image; it sees the first ``head_bytes`` bytes (or the whole, shorter, body)."""
        self.settings = settings
        self.check_head = check_head
        self.head_bytes = head_bytes
        self.policy = AddressPolicy(parse_cidrs(settings.fetch_allowed_cidrs))
        self.hosts = HostGates(
            per_host=settings.fetch_per_host,
            max_wait_s=settings.fetch_max_host_wait_s,
            base_backoff_s=max(settings.fetch_backoff_s, 0.1),
        )
        # Taken after the host's gate: a request waiting for its host holds no slot.
        self.slots = asyncio.Semaphore(settings.fetch_concurrency)
        connector = guarded_connector(
            self.policy,
            limit=settings.fetch_concurrency,
            limit_per_host=settings.fetch_per_host,
            ttl_dns_cache=settings.fetch_dns_cache_s,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # No total here: fetch() keeps one deadline across all hops of a download.
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.fetch_connect_timeout_s,
                sock_read=settings.fetch_read_timeout_s,
            ),
            headers={"User-Agent": settings.fetch_user_agent, "Accept": "image/*,*/*;q=0.5"},
            auto_decompress=True,
            # Never a proxy from the environment: it would connect where the guard cannot see.
            trust_env=False,
            # No cookies: nothing carries over between hosts or items.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Exact URLs: ours are already normalized, re-quoting would change them.
            requote_redirect_url=False,
            read_bufsize=256 * 1024,
        )

    async def close(self) -> None:
        await self.session.close()

    async def fetch(self, url: str) -> Downloaded:
        """The body at ``url``, retrying transient failures with backoff."""
        settings = self.settings

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ItemError):
                RETRIES.labels(exc.error_class).inc()
            # A host's Retry-After is waited out at its gate, by every request to it.
            return float(wait_exponential_jitter(initial=settings.fetch_backoff_s, max=30)(state))

        def retryable(exc: BaseException) -> bool:
            return (
                isinstance(exc, ItemError)
                and exc.transient
                and (exc.retry_after_s or 0.0) <= settings.fetch_max_host_wait_s
            )

        started = time.perf_counter()
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(settings.fetch_attempts),
            wait=wait,
            retry=retry_if_exception(retryable),
            reraise=True,
        ):
            with attempt:
                downloaded = await self.fetch_once(url)
        FETCH_SECONDS.observe(time.perf_counter() - started)
        FETCH_BYTES.inc(len(downloaded.body))
        return downloaded

    async def fetch_once(self, url: str) -> Downloaded:
        """One attempt: follow up to FETCH_MAX_REDIRECTS redirects, each hop checked."""
        loop = asyncio.get_running_loop()
        budget = self.settings.fetch_total_timeout_s
        current = url
        for _ in range(self.settings.fetch_max_redirects + 1):
            target, origin = self._checked_url(current)
            async with self.hosts.admit(origin), self.slots:
                started = loop.time()
                try:
                    async with asyncio.timeout(budget):
                        answer = await self._request(target, origin)
                except (aiohttp.ClientError, OSError) as exc:  # OSError covers TimeoutError
                    raise self._failure(exc) from None
                budget -= loop.time() - started
            if isinstance(answer, Downloaded):
                return answer
            current = answer
        raise ItemError(
            ErrorClass.TOO_MANY_REDIRECTS,
            f"more than {self.settings.fetch_max_redirects} redirects",
        )

    def _checked_url(self, url: str) -> tuple[URL, str]:
        """``url`` parsed exactly as aiohttp will use it, refused unless http(s) to a host
        the guard allows by syntax (resolved names are checked at connect time); and its
        ``host:port``, the key of its politeness gate."""
        try:
            target = URL(url, encoded=True)
        except ValueError as exc:
            raise ItemError(ErrorClass.INVALID_URL, f"unparsable URL: {exc}") from None
        host = target.raw_host
        if target.scheme not in ("http", "https") or not host:
            raise ItemError(
                ErrorClass.INVALID_URL, f"not an http(s) URL: {target.scheme or '?'}://"
            )
        try:
            check_url(target, self.policy)
        except BlockedAddressError as exc:
            raise ItemError(ErrorClass.BLOCKED_ADDRESS, str(exc)) from None
        return target, f"{host.lower()}:{target.port}"

    async def _request(self, target: URL, origin: str) -> Downloaded | str:
        """The body, or the next hop's URL."""
        async with self.session.get(target, allow_redirects=False) as response:
            status = response.status
            RESPONSES.labels(f"{status // 100}xx").inc()
            if status in _SLOW_DOWN:
                self.hosts.back_off(origin, retry_after_s(response.headers.get("Retry-After")))
            else:
                self.hosts.served(origin)
            if status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise ItemError(ErrorClass.HTTP_CLIENT_ERROR, f"HTTP {status} without Location")
                return urljoin(str(target), location)
            _check_status(response)
            if self.settings.fetch_respect_noai:
                directive = opts_out(
                    response.headers.getall("X-Robots-Tag", ()), self.settings.fetch_robots_agent
                )
                if directive is not None:
                    raise ItemError(
                        ErrorClass.OPTED_OUT, f"X-Robots-Tag: {directive} (no AI use allowed)"
                    )
            return Downloaded(await self._read(response), str(target))

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.fetch_max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise ItemError(
                ErrorClass.TOO_LARGE, f"{declared} bytes declared, the limit is {limit}"
            )
        # Counted after Content-Encoding is undone (aiohttp inflates in bounded steps), so
        # a small gzip body that inflates past the limit stops there too.
        buffer = bytearray()
        checked = False
        async for chunk in response.content.iter_any():
            buffer += chunk
            if len(buffer) > limit:
                raise ItemError(ErrorClass.TOO_LARGE, f"body exceeds the limit of {limit} bytes")
            if not checked and len(buffer) >= self.head_bytes:
                self.check_head(bytes(buffer[: self.head_bytes]))
                checked = True
        if not checked:
            self.check_head(bytes(buffer))
        return bytes(buffer)

    def _failure(self, exc: aiohttp.ClientError | OSError) -> ItemError:
        """The ItemError for an exception raised while requesting or reading."""
        settings = self.settings
        blocked = blocked_cause(exc)
        if blocked is not None:
            return ItemError(ErrorClass.BLOCKED_ADDRESS, str(blocked))
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ItemError(
                ErrorClass.TIMEOUT, f"no connection within {settings.fetch_connect_timeout_s} s"
            )
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return ItemError(
                ErrorClass.TIMEOUT, f"the server sent nothing for {settings.fetch_read_timeout_s} s"
            )
        if isinstance(exc, TimeoutError):
            return ItemError(
                ErrorClass.TIMEOUT,
                f"the download took longer than {settings.fetch_total_timeout_s} s",
            )
        if isinstance(exc, aiohttp.InvalidURL):
            return ItemError(ErrorClass.INVALID_URL, f"invalid URL: {exc}")
        if isinstance(exc, aiohttp.ClientResponseError):  # the parser refused the response
            return ItemError(
                ErrorClass.CONNECTION_ERROR, "malformed response: " + _one_line(exc.message)
            )
        return ItemError(ErrorClass.CONNECTION_ERROR, _one_line(str(exc) or type(exc).__name__))


def _check_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status}"
    if status in (404, 410):
        raise ItemError(ErrorClass.NOT_FOUND, reason)
    if status == 429:
        raise ItemError(
            ErrorClass.RATE_LIMITED, reason, retry_after_s(response.headers.get("Retry-After"))
        )
    if status >= 500:
        raise ItemError(
            ErrorClass.HTTP_SERVER_ERROR, reason, retry_after_s(response.headers.get("Retry-After"))
        )
    raise ItemError(ErrorClass.HTTP_CLIENT_ERROR, reason)


def _one_line(text: str) -> str:
    """A short single line (aiohttp's parser errors quote the offending bytes at length)."""
    text = text.strip().splitlines()[0] if text.strip() else text
    return text if len(text) <= 200 else text[:197] + "..."
