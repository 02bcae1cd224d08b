"""Downloading one image: redirects, timeouts, a byte cap enforced while streaming,
early content checks, and the mapping of every failure to an error class."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from imagestream.common.errors import ErrorClass, ItemError

from .guard import AddressPolicy, GuardedResolver, blocked_cause

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEAD_BYTES = 64


@dataclass(frozen=True, slots=True)
class Downloaded:
    body: bytes
    url: str
    headers: CIMultiDictProxy[str]


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Downloader:
    def __init__(
        self,
        *,
        policy: AddressPolicy,
        concurrency: int,
        per_host: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float,
        max_bytes: int,
        max_redirects: int,
        user_agent: str,
        check_head: Callable[[bytes], None],
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.check_head = check_head
        self.timeout = aiohttp.ClientTimeout(
            total=total_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        connector = aiohttp.TCPConnector(
            limit=concurrency,
            limit_per_host=per_host,
            ttl_dns_cache=300,
            resolver=GuardedResolver(policy),
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            headers={"User-Agent": user_agent, "Accept": "image/*,*/*;q=0.5"},
            auto_decompress=True,
            # Exact URLs: ours are already normalized, re-quoting would change them.
            requote_redirect_url=False,
        )

    async def close(self) -> None:
        await self.session.close()

    async def fetch(self, url: str) -> Downloaded:
        current = url
        for _ in range(self.max_redirects + 1):
            self._check_url(current)
            try:
                async with self.session.get(
                    URL(current, encoded=True), allow_redirects=False
                ) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            raise ItemError(
                                ErrorClass.HTTP_CLIENT_ERROR, "redirect without Location"
                            )
                        current = urljoin(current, location)
                        continue
                    self._check_status(response)
                    body = await self._read(response)
                    return Downloaded(body, current, response.headers)
            except ItemError:
                raise
            except TimeoutError:
                raise ItemError(ErrorClass.TIMEOUT, "timed out") from None
            except aiohttp.ClientConnectorError as exc:
                blocked = blocked_cause(exc)
                if blocked is not None:
                    raise ItemError(ErrorClass.BLOCKED_ADDRESS, str(blocked)) from None
                raise ItemError(ErrorClass.CONNECTION_ERROR, _reason(exc)) from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise ItemError(ErrorClass.CONNECTION_ERROR, _reason(exc)) from None
        raise ItemError(ErrorClass.TOO_MANY_REDIRECTS, f"more than {self.max_redirects} redirects")

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ItemError(ErrorClass.INVALID_URL, f"not an http(s) URL: {parts.scheme or '?'}://")
        blocked = None
        try:
            self.policy.check_literal(parts.hostname)
        except OSError as exc:
            blocked = exc
        if blocked is not None:
            raise ItemError(ErrorClass.BLOCKED_ADDRESS, str(blocked))

    @staticmethod
    def _check_status(response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status < 300:
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
                ErrorClass.HTTP_SERVER_ERROR,
                reason,
                retry_after_s(response.headers.get("Retry-After")),
            )
        raise ItemError(ErrorClass.HTTP_CLIENT_ERROR, reason)

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self.max_bytes:
            raise ItemError(
                ErrorClass.TOO_LARGE, f"{declared} bytes declared, the limit is {self.max_bytes}"
            )
        buffer = bytearray()
        checked = False
        async for chunk in response.content.iter_chunked(64 * 1024):
            buffer += chunk
            if len(buffer) > self.max_bytes:
                raise ItemError(ErrorClass.TOO_LARGE, f"body exceeds {self.max_bytes} bytes")
            if not checked and len(buffer) >= _HEAD_BYTES:
                self.check_head(bytes(buffer[:_HEAD_BYTES]))
                checked = True
        if not checked:
            if not buffer:
                raise ItemError(ErrorClass.NOT_AN_IMAGE, "empty response body")
            self.check_head(bytes(buffer))
        return bytes(buffer)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]
