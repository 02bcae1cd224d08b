"""The server-side request forgery guard: which addresses the fetcher may connect to.

Public unicast addresses only, unless ``FETCH_ALLOWED_CIDRS`` allows a range. The check
runs on the addresses DNS returned (the connection is made to exactly those addresses,
so a second, different DNS answer cannot slip past), and on literal IP hosts, which
aiohttp does not resolve. Every redirect hop goes through the same path.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges refused even where the stdlib's is_global says otherwise, or that it misses.
_EXTRA_BLOCKED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "64:ff9b:1::/48",  # local-use NAT64
    )
)


class BlockedAddressError(OSError):
    """The host resolves only to addresses the fetcher must not connect to."""


def parse_cidrs(values: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


class AddressPolicy:
    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        self.allowed = tuple(allowed)

    def permits(self, address: IPAddress) -> bool:
        # An IPv4 address written as IPv6 (::ffff:a.b.c.d, 6to4...) is judged as IPv4.
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped or address.sixtofour
            if mapped is not None:
                address = mapped
        if any(address in net for net in self.allowed):
            return True
        if not address.is_global or address.is_multicast or address.is_reserved:
            return False
        return not any(address in net for net in _EXTRA_BLOCKED)

    def check_literal(self, host: str) -> None:
        """Refuse a literal IP host that is not permitted (aiohttp does not resolve these)."""
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        if not self.permits(address):
            raise BlockedAddressError(f"address {address} is not a public address")


class GuardedResolver(AbstractResolver):
    """DNS resolution that drops every address the policy refuses."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        allowed = [r for r in results if self.policy.permits(ipaddress.ip_address(r["host"]))]
        if not allowed:
            shown = ", ".join(sorted({r["host"] for r in results}))
            raise BlockedAddressError(f"{host} resolves to non-public address {shown}")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def blocked_cause(exc: BaseException) -> BlockedAddressError | None:
    """The BlockedAddressError behind an aiohttp connection error, if that is what it is."""
    seen: Any = exc
    while seen is not None:
        if isinstance(seen, BlockedAddressError):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return None
