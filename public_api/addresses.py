"""Client addresses as the per-address limits see them."""

from __future__ import annotations

import ipaddress

IPV6_PREFIX = 64  # one subscriber's allocation: its hosts choose addresses in it freely


def limit_subject(address: str) -> str:
    """The per-address limit's subject for ``address``: the /64 of an IPv6 client, else the
    address itself (an IPv4-mapped IPv6 address is its IPv4 address; a non-IP is unchanged).

    A client given a /64 picks any of its 2^64 addresses per request, so limiting single IPv6
    addresses would limit nothing.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        host_bits = 128 - IPV6_PREFIX
        return str(ipaddress.IPv6Network((int(ip) >> host_bits << host_bits, IPV6_PREFIX)))
    return str(ip)
