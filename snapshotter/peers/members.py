"""Who the peers are, and which of them are alive.

Members come from sources (`MemberSource`: a static list, a DNS name, a Kubernetes Service's
EndpointSlices), re-read every `refresh_sec`; the members are the union of every source's
last good list, this node excluded. A source that cannot be read keeps its last good list
(one warning per failure streak), so a DNS or API outage does not empty the peer set.

Health is local knowledge: callers report failures (`mark_down`) and successes (`mark_up`);
a member that failed is skipped by `live()` for a back-off that doubles with each further
consecutive failure, up to a cap. When the back-off has passed the member is live again on
probation: its next failure doubles the back-off again, a success resets it. A member's
health survives refreshes while any source lists it; a member no source lists any more is
forgotten.

Everything here runs on the trio thread; nothing is shared with other threads.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from snapshotter.peers.address import format_address, parse_address

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True, slots=True)
class Member:
    """One peer node: an IP address (compressed form) and the port of its peer listener.

    Two members are the same node when host and port match; `zone` (the topology zone, when
    a source knows it) is carried along but takes no part in equality or order.
    """

    host: str
    port: int
    zone: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        """`"ADDR:PORT"` (`"[ADDR]:PORT"` for IPv6): the node's name in logs and hashing."""
        return format_address(self.host, self.port)


class MembershipError(Exception):
    """A source could not be read (DNS timeout or failure, Kubernetes API error, a bad
    credential file); the message is one line naming the source. The membership keeps that
    source's last good list."""


class MemberSource(Protocol):
    """Where members come from. `name` is `"static"`, `"dns:<name>"` or
    `"kubernetes:<namespace>/<service>"` (in logs and status)."""

    name: str

    async def resolve(self) -> list[Member]:
        """The members this source lists now (possibly none). Raises MembershipError."""
        ...


class StaticMembers:
    """A fixed list of `"ADDR:PORT"` peers (the `static` setting).

    Raises AddressError (a ValueError, one line) on construction for text that is not an
    `ADDR:PORT` with a reachable IP address.
    """

    name = "static"

    def __init__(self, addresses: Sequence[str]) -> None:
        parsed = (parse_address(a, allow_unspecified=False) for a in addresses)
        self._members = sorted({Member(host, port) for host, port in parsed})

    def __repr__(self) -> str:
        return f"<StaticMembers {[m.id for m in self._members]}>"

    async def resolve(self) -> list[Member]:
        return list(self._members)


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (network namespace): a socket can bind
    to it (port 0).

    `host` is an IP address; anything else, and any failure to bind, is False. One socket
    call, no blocking.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip.compressed, 0))
    except OSError:
        return False
    return True


def _normalise_host(host: str) -> str | None:
    """An IP address in compressed form, IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as IPv4; None
    when `host` is not an IP address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.compressed
    return ip.compressed


@dataclass(slots=True)
class _Health:
    """What callers reported about one member. Down while `clock() < down_until`; on
    probation when `failures > 0` and the back-off has passed."""

    failures: int = 0
    down_until: float = 0.0
    last_error: str = ""


@dataclass(slots=True)
class _SourceState:
    members: list[Member] = field(default_factory=list)
    failing: bool = False


class Membership:
    """The peer set: the union of `sources`, this node excluded, and each member's health.

    This node is the member whose port is `advertise`'s port and whose host is
    `advertise`'s host or an address of this machine (`is_local_address`, asked once per
    host). Back-offs are in seconds of `clock` (trio's clock by default, so tests can use a
    mock clock): the first failure skips a member for `down_backoff_sec`, each further
    consecutive failure doubles that, up to `down_backoff_max_sec`.

    `serve()` keeps the list fresh; until its first refresh the peer set is empty.
    """

    def __init__(
        self,
        sources: Sequence[MemberSource],
        *,
        advertise: tuple[str, int],
        refresh_sec: float,
        down_backoff_sec: float,
        down_backoff_max_sec: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._sources = [(source, _SourceState()) for source in sources]
        self._advertise = (_normalise_host(advertise[0]) or advertise[0], advertise[1])
        self._refresh_sec = refresh_sec
        self._backoff = down_backoff_sec
        self._backoff_max = max(down_backoff_max_sec, down_backoff_sec)
        self._clock = clock
        self._local: dict[str, bool] = {}
        self._members: tuple[Member, ...] = ()
        self._member_set: frozenset[Member] = frozenset()
        self._hosts: frozenset[str] = frozenset()
        self._health: dict[Member, _Health] = {}

    def __repr__(self) -> str:
        names = [source.name for source, _ in self._sources]
        return f"<Membership members={len(self._members)} live={len(self.live())} sources={names}>"

    # -- the list ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Reads every source once, side by side, and recomputes the members.

        A source raising MembershipError keeps its last good list; the first failure of a
        streak is logged (`membership source failed`, warning, keys `source`, `error`), the
        recovery too (`membership source recovered`, info). Members new to the union are
        logged `peer joined`, members gone from it `peer left` (info, key `peer`). Any other
        exception from a source is a bug and propagates.
        """
        async with trio.open_nursery() as nursery:
            for source, state in self._sources:
                nursery.start_soon(self._refresh_one, source, state)
        self._recompute()

    async def _refresh_one(self, source: MemberSource, state: _SourceState) -> None:
        try:
            members = await source.resolve()
        except MembershipError as e:
            if not state.failing:
                log.warning(
                    "membership source failed",
                    extra={"source": source.name, "error": str(e), "kept": len(state.members)},
                )
            state.failing = True
            return
        if state.failing:
            log.info(
                "membership source recovered",
                extra={"source": source.name, "members": len(members)},
            )
        state.failing = False
        state.members = list(members)

    def _recompute(self) -> None:
        union: dict[Member, Member] = {}
        listed: set[str] = set()
        for _, state in self._sources:
            for m in state.members:
                listed.add(m.host)
                if self._is_self(m):
                    continue
                # the same node from two sources: keep the zone one of them knows
                if m not in union or (m.zone and not union[m].zone):
                    union[m] = m
        new = tuple(sorted(union.values()))
        for m in new:
            if m not in self._member_set:
                log.info("peer joined", extra={"peer": m.id, "zone": m.zone})
        for m in self._members:
            if m not in union:
                log.info("peer left", extra={"peer": m.id})
                self._health.pop(m, None)
        self._members = new
        self._member_set = frozenset(new)
        self._hosts = frozenset(m.host for m in new)
        # forget the answers for addresses no source lists any more (pod IPs come and go)
        self._local = {h: v for h, v in self._local.items() if h in listed}

    def _is_self(self, m: Member) -> bool:
        if m.port != self._advertise[1]:
            return False
        if m.host == self._advertise[0]:
            return True
        local = self._local.get(m.host)
        if local is None:
            local = self._local[m.host] = is_local_address(m.host)
        return local

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refreshes now, reports started (after that first refresh), then refreshes every
        `refresh_sec`, forever; the owner's scope cancels it."""
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self._refresh_sec)
            await self.refresh()

    def members(self) -> tuple[Member, ...]:
        """Every member, sorted, this node excluded."""
        return self._members

    def live(self) -> tuple[Member, ...]:
        """The members not currently marked down (those on probation included), sorted."""
        return tuple(m for m in self._members if self.is_live(m))

    def is_live(self, member: Member) -> bool:
        """Whether `member` is not currently marked down (see `live`)."""
        h = self._health.get(member)
        return h is None or self._clock() >= h.down_until

    def is_member(self, host: str) -> bool:
        """Whether any member (any port, up or down) has IP address `host`; IPv4-mapped IPv6
        counts as its IPv4 address. Not an IP address: False."""
        normal = _normalise_host(host)
        return normal is not None and normal in self._hosts

    # -- health -----------------------------------------------------------------------------

    def mark_down(self, member: Member, reason: str) -> None:
        """Reports a failed request to `member` (`reason`: one line, shown in status).

        A live member is skipped from now on for its back-off: `down_backoff_sec` after a
        success, doubled for each further consecutive failure, at most
        `down_backoff_max_sec`. A member already down only has its reason updated (requests
        that were in flight when it went down fail too; they are the same failure). The first
        failure after being up logs `peer down` (warning, keys `peer`, `reason`,
        `backoff_sec`); a failure on probation logs `peer still down` (debug). A member no
        source lists is ignored.
        """
        if member not in self._member_set:
            return
        h = self._health.setdefault(member, _Health())
        now = self._clock()
        h.last_error = reason
        if now < h.down_until:
            return
        h.failures += 1
        backoff = min(self._backoff * 2 ** (h.failures - 1), self._backoff_max)
        h.down_until = now + backoff
        extra = {"peer": member.id, "reason": reason, "backoff_sec": backoff}
        if h.failures == 1:
            log.warning("peer down", extra=extra)
        else:
            log.debug("peer still down", extra={**extra, "failures": h.failures})

    def mark_up(self, member: Member) -> None:
        """Reports a successful request to `member`: its failures and back-off are reset and,
        if it had failed, `peer up` is logged (info, key `peer`). The last error stays in
        status."""
        h = self._health.get(member)
        if h is None or h.failures == 0:
            return
        h.failures = 0
        h.down_until = 0.0
        log.info("peer up", extra={"peer": member.id})

    def status(self) -> list[dict[str, object]]:
        """One JSON-serialisable dict per member, sorted: `peer` (id), `state` (`"up"` or
        `"down"`; a member on probation is up), `zone`, `failures` (consecutive),
        `lastError` (the last reason reported, `""` if none) and, only when down,
        `downForSec` (seconds of back-off left)."""
        now = self._clock()
        out: list[dict[str, object]] = []
        for m in self._members:
            h = self._health.get(m) or _Health()
            down = now < h.down_until
            entry: dict[str, object] = {
                "peer": m.id,
                "state": "down" if down else "up",
                "zone": m.zone,
                "failures": h.failures,
                "lastError": h.last_error,
            }
            if down:
                entry["downForSec"] = round(h.down_until - now, 3)
            out.append(entry)
        return out
