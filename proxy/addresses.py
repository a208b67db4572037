"""Client addresses: parsed once, IPv4-mapped IPv6 seen as IPv4, matched against networks."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def parse_ip(ip: str) -> Address | None:
    """The address, with `::ffff:10.1.2.3` as `10.1.2.3`; None if `ip` is not an address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=1024)
def _network(cidr: str):
    return ipaddress.ip_network(cidr, strict=False)


def in_networks(ip: str, networks: Iterable) -> bool:
    """True if `ip` lies in one of `networks` (network objects or CIDR strings)."""
    addr = parse_ip(ip)
    if addr is None:
        return False
    return any(addr in (_network(n) if isinstance(n, str) else n) for n in networks)
