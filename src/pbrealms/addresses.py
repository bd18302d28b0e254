"""
Connection addresses: as a log line shows them, as a source to count and
penalise, and whether they stay on this machine.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress


def describeAddress(address: object) -> str:
    """
    An address as a person reads it: C{host:port}, C{[v6]:port}, C{unix:path}.
    """
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return "unix:" + (name.decode() if isinstance(name, bytes) else str(name or "-"))
    return str(address)


def sourceOf(address: object) -> str:
    """
    The source address of a connection, as text; an IPv4 client of a
    dual-stack IPv6 socket (C{::ffff:127.0.0.1}) as the IPv4 address it is,
    and C{""} for a UNIX socket.
    """
    host = getattr(address, "host", "")
    if not isinstance(host, str):
        return ""
    try:
        mapped = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        return str(mapped.ipv4_mapped)
    return host


def isLocal(address: object) -> bool:
    """
    Whether C{address} is one that no other machine can use: a UNIX socket,
    or loopback (IPv4-mapped loopback included).
    """
    if isinstance(address, UNIXAddress):
        return True
    try:
        return ipaddress.ip_address(sourceOf(address)).is_loopback
    except ValueError:
        return False
