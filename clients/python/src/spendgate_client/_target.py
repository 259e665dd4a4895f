"""What is wrong with a gRPC target's port, checked when a client is made.

A port out of range is wrapped by gRPC onto another port, and one that is not a number
fails every call: with ``fail_mode="open"`` that would allow every call unguarded. The
client is installable alone, so this mirrors the server's check
(``spendgate_server.admin.channel.target_problem``); a test keeps the two equal.
"""

from __future__ import annotations

__all__ = ["target_problem"]

# Name-resolver schemes whose address ends in host[:port] (grpc's naming doc); others (unix:) have none.
_HOST_PORT_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def target_problem(target: str) -> str | None:
    """What is wrong with the port of a gRPC ``target``, or None when it has none or a valid one.

    ``host:port``, ``[v6]:port`` and the ``dns:``/``ipv4:``/``ipv6:`` forms carry a port,
    which must be a decimal number in 1..65535. A bare host (gRPC's default port), a bare
    IPv6 address and the ``unix:`` forms have no port to check.
    """
    address = target
    scheme = next((s for s in _HOST_PORT_SCHEMES if target.lower().startswith(s)), None)
    if scheme is not None:
        address = target[len(scheme) :]
        if address.startswith("//"):  # dns://authority/host:port
            address = address[2:].partition("/")[2]
        address = address.split(",")[0]  # ipv4:a:1,b:2 lists addresses
    elif "://" in target or target.lower().startswith(("unix:", "unix-abstract:", "vsock:")):
        return None  # another scheme, or a socket path: no port to check
    if address.startswith("["):
        host, bracket, rest = address.partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return "a bracketed IPv6 host must be '[address]:port'"
        if not rest:
            return None  # [v6] alone: gRPC's default port
        port = rest[1:]
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        return None  # a bare host or a bare IPv6 address: no port given
    if not host.strip("["):
        return "the host is empty"
    if not port.isascii() or not port.isdigit():
        return f"the port must be a number in 1..65535, got {port!r}"
    if not 1 <= int(port) <= 65535:
        return f"the port must be in 1..65535, got {int(port)}"
    return None
