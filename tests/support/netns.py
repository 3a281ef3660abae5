"""A network namespace joined to the host by a veth pair, with an optional ``tc`` rate limit.

:func:`open_netns` creates namespace ``<name>``, a veth pair (``<name>-h`` on the host,
``<name>-n`` inside), a /30 out of ``10.231.<subnet>.0`` (host ``.1``, namespace ``.2``), and
brings both ends and the namespace's loopback up. :meth:`NetNs.limit` puts a ``tbf`` qdisc on
the host end (traffic towards the namespace) and the namespace end (traffic out of it, i.e.
what a server inside sends), both at the same rate. :meth:`NetNs.counters` reads the host end's
byte counters (``rx`` = bytes the namespace sent to the host). Everything is removed on exit,
also when the body raises. Only addresses this module creates are used.

Needs root, ``ip`` and ``tc`` (iproute2), and the ``veth`` and ``sch_tbf`` kernel features;
errors are :class:`NetNsError` with the failing command and its stderr.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

TBF_BURST = "256kb"
"""Bucket size: at least rate/HZ; 256 KiB keeps 200 Mbit/s smooth at HZ=250."""
TBF_LATENCY = "50ms"
"""How long a packet may wait in the bucket's queue before it is dropped."""


class NetNsError(Exception):
    """A namespace, link or qdisc command failed; the message has the command and its stderr."""


def _run(cmd: Sequence[str], *, check: bool = True) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise NetNsError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class LinkCounters:
    """Byte and packet counters of the host end of the veth pair."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass(frozen=True)
class NetNs:
    """A namespace made by :func:`open_netns`."""

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def exec_args(self, *cmd: str) -> list[str]:
        """``ip netns exec <name> <cmd...>``: the argv to run ``cmd`` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def limit(self, rate: str, *, burst: str = TBF_BURST, latency: str = TBF_LATENCY) -> None:
        """Rate-limits both directions to ``rate`` (a tc rate such as ``200mbit``) with a tbf
        qdisc on each end (replacing an earlier one). Raises :class:`NetNsError`."""
        spec = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        _run(["tc", "qdisc", "replace", "dev", self.host_if, *spec])
        _run(self.exec_args("tc", "qdisc", "replace", "dev", self.ns_if, *spec))

    def unlimit(self) -> None:
        """Removes the rate limits (no error when there are none)."""
        _run(["tc", "qdisc", "del", "dev", self.host_if, "root"], check=False)
        _run(self.exec_args("tc", "qdisc", "del", "dev", self.ns_if, "root"), check=False)

    def qdiscs(self) -> str:
        """``tc qdisc show`` of both ends (for reports)."""
        host = _run(["tc", "qdisc", "show", "dev", self.host_if])
        inside = _run(self.exec_args("tc", "qdisc", "show", "dev", self.ns_if))
        return host + inside

    def counters(self) -> LinkCounters:
        """The host end's counters (``rx_bytes``: everything the namespace sent the host).
        Raises :class:`NetNsError`."""
        try:
            doc = json.loads(_run(["ip", "-s", "-j", "link", "show", "dev", self.host_if]))
            stats = doc[0]["stats64"]
            return LinkCounters(
                rx_bytes=int(stats["rx"]["bytes"]),
                tx_bytes=int(stats["tx"]["bytes"]),
                rx_packets=int(stats["rx"]["packets"]),
                tx_packets=int(stats["tx"]["packets"]),
            )
        except (ValueError, KeyError, IndexError) as e:
            raise NetNsError(f"reading counters of {self.host_if}: {e!r}") from e


def _cleanup(name: str, host_if: str) -> None:
    # Deleting one end of a veth pair deletes both; do it before the namespace, whose own
    # teardown is asynchronous and would leave the host end behind for a moment.
    _run(["ip", "link", "del", host_if], check=False)
    _run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def open_netns(name: str = "sociable-bench", subnet: int = 231) -> Iterator[NetNs]:
    """Creates the namespace and veth pair described in the module docstring, yields a
    :class:`NetNs`, and removes both on exit. A namespace or link left with the same name by
    an earlier crashed run is removed first. ``name`` must be at most 13 characters (interface
    names get a 2-character suffix). Raises :class:`NetNsError`."""
    if len(name) > 13:
        raise NetNsError(f"namespace name {name!r}: longer than 13 characters")
    ns = NetNs(
        name=name,
        host_if=f"{name}-h",
        ns_if=f"{name}-n",
        host_ip=f"10.231.{subnet}.1",
        ns_ip=f"10.231.{subnet}.2",
    )
    _cleanup(name, ns.host_if)
    try:
        _run(["ip", "netns", "add", name])
        _run(["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if])
        _run(["ip", "link", "set", ns.ns_if, "netns", name])
        _run(["ip", "addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if])
        _run(["ip", "link", "set", ns.host_if, "up"])
        _run(ns.exec_args("ip", "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if))
        _run(ns.exec_args("ip", "link", "set", ns.ns_if, "up"))
        _run(ns.exec_args("ip", "link", "set", "lo", "up"))
        yield ns
    finally:
        _cleanup(name, ns.host_if)


__all__ = ["LinkCounters", "NetNs", "NetNsError", "open_netns"]
