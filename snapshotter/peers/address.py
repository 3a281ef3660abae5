"""Peer addresses: `"ADDR:PORT"` text ↔ (host, port), IPv4 and IPv6 (`"[ADDR]:PORT"`).

Pure and import-light: the configuration checks addresses with it before anything runs.
"""

from __future__ import annotations

import ipaddress


class AddressError(ValueError):
    """Text that is not an `ADDR:PORT` with an IP address and a port in 1..65535."""


def parse_address(text: str, *, allow_unspecified: bool = True) -> tuple[str, int]:
    """`"10.0.0.1:8472"` → `("10.0.0.1", 8472)`; `"[fd00::1]:8472"` → `("fd00::1", 8472)`.

    The host must be an IP address (names are for `dns`); `allow_unspecified=False` rejects
    `0.0.0.0` and `::`. Raises AddressError with a one-line reason.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r} is not ADDR:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"{text!r}: port must be a number in 1..65535")
    if not allow_unspecified and ip.is_unspecified:
        raise AddressError(f"{text!r}: {host} is not an address other nodes can reach")
    return ip.compressed, int(port_text)


def format_address(host: str, port: int) -> str:
    """(host, port) → `"ADDR:PORT"`, brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
