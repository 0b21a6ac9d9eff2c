"""Which addresses an outgoing webhook or Web Push may connect to: public ones, and the hosts an operator listed.

A webhook URL can come from a profile trait, and a Web Push endpoint is whatever the push subscription on the
profile says (written by a browser, or by anyone who can write to the profile), so whoever can write a
profile can name a host. Without a guard that host could be the cloud metadata service (169.254.169.254),
the node's own ports or anything on the private network, and the platform would call it with its signature
on the request. Both channels use this module; each has its own list of hosts (CDP_WEBHOOK_ALLOWED_HOSTS,
CDP_WEBPUSH_ALLOWED_HOSTS). Invariants:

- An address that is not public - loopback, private (RFC 1918, ULA), shared (100.64/10), link-local
  (169.254/16, fe80::/10), multicast, unspecified, reserved, documentation - is refused, for IPv4 and IPv6
  alike; an IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
  6to4 ``2002::/16``) is judged by the IPv4 address inside it.
- A host named in the channel's list is exempt: an operator who lists ``localhost`` or a private
  receiver means it. The exemption is by the name in the URL, never by what a name resolves to.
- What is checked is what is connected to. `GuardedResolver` is the resolver of the channel's aiohttp
  connector: it resolves a name once, checks every address of the answer and hands the connector only an
  answer it checked, so a name that resolves to a public address for the check and to a private one for
  the connection (DNS rebinding) has no second resolution to exploit. aiohttp does not resolve an IP
  literal, so the channel checks those itself (`refusal` on the URL's host) before the request.
- A name whose answer holds any refused address is refused as a whole, rather than connecting to the rest.
- The URL is parsed once, by the parser aiohttp connects with (`parse_url`), so the host checked is the
  host connected to; redirects are not followed and at most a bounded part of an answer is read
  (`read_at_most`), which the channels do per request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


#: the variable that lists a webhook's exempt hosts, named in a refusal unless a channel names its own
WEBHOOK_HOSTS = "CDP_WEBHOOK_ALLOWED_HOSTS"


class DestinationRefused(OSError):
    """A host resolves to (or is) an address the channel does not call. `kind` says which class of address
    (``loopback``, ``private``, ...); the message names neither the host nor the address, since the URL
    can be customer data, only the variable (`variable`) that would list the host."""

    def __init__(self, kind: str, variable: str = WEBHOOK_HOSTS) -> None:
        super().__init__(f"destination refused: a {kind} address (list its host in {variable})")
        self.kind = kind


def normal_host(host: str | None) -> str:
    """A host as the allowed list is compared: lower case, no trailing dot, no IPv6 brackets."""
    return (host or "").strip().strip("[]").rstrip(".").lower()


def literal(host: str) -> Address | None:
    """The address when `host` is an IP literal, else None."""
    try:
        return ipaddress.ip_address(normal_host(host))
    except ValueError:
        return None


def refusal(address: Address) -> str | None:
    """Why the channel refuses to connect to `address` (the class of address), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return refusal(inner)
        address = ipaddress.IPv6Address(int(address))  # drop a scope id (fe80::1%eth0)
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind
    if not address.is_global:  # shared address space (100.64/10), other special-purpose blocks
        return "special_purpose"
    return None


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that answers only with addresses the channel may call.

    Names in `allowed` are resolved as they are (the operator listed them); any other name whose answer
    holds a refused address raises `DestinationRefused`, which aiohttp hands back as the `os_error` of a
    ClientConnectorError."""

    def __init__(
        self, allowed: Iterable[str] = (), resolver: AbstractResolver | None = None, *, variable: str = WEBHOOK_HOSTS
    ) -> None:
        self._allowed = frozenset(normal_host(host) for host in allowed)
        self._variable = variable
        self._owns_resolver = resolver is None
        self._resolver = resolver if resolver is not None else DefaultResolver()

    def allows(self, host: str) -> bool:
        """Whether `host` is listed, and so exempt from the address check."""
        return normal_host(host) in self._allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answer = await self._resolver.resolve(host, port, family)
        if self.allows(host):
            return answer
        for result in answer:
            address = literal(result["host"])
            kind = "unparseable" if address is None else refusal(address)
            if kind is not None:
                raise DestinationRefused(kind, self._variable)
        return answer

    async def close(self) -> None:
        if self._owns_resolver:
            await self._resolver.close()


def parse_url(text: str) -> URL | None:
    """`text` as aiohttp will read it when it connects (yarl), or None when it is no URL at all."""
    try:
        return URL(text)
    except ValueError:
        return None


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> None:
    """Read an answer's body up to `limit` bytes, so a kept-alive connection can be reused; past that the
    connection is dropped rather than read on (the status is the answer: whatever a URL names cannot make
    the service hold an unbounded body)."""
    read = 0
    while read < limit:
        chunk = await response.content.read(limit - read)
        if not chunk:
            return
        read += len(chunk)
    response.close()
