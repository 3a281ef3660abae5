"""Membership: static parsing, self-exclusion, the union of sources, a failing source, the
down back-off (fake clock), probation, recovery, the log lines and `status()`."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from snapshotter.peers.address import AddressError
from snapshotter.peers.members import (
    Member,
    Membership,
    MembershipError,
    StaticMembers,
    is_local_address,
)

LOGGER = "snapshotter.peers.members"
ADVERTISE = ("10.0.0.5", 8472)


class FakeSource:
    """A source whose answer the test sets: a list, or an error to raise."""

    def __init__(self, name: str, members: list[Member] | None = None) -> None:
        self.name = name
        self.members = members or []
        self.error: str | None = None
        self.calls = 0

    async def resolve(self) -> list[Member]:
        self.calls += 1
        if self.error is not None:
            raise MembershipError(f"{self.name}: {self.error}")
        return list(self.members)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    *sources: FakeSource,
    clock: FakeClock | None = None,
    backoff: float = 5.0,
    backoff_max: float = 20.0,
) -> Membership:
    return Membership(
        sources,
        advertise=ADVERTISE,
        refresh_sec=10.0,
        down_backoff_sec=backoff,
        down_backoff_max_sec=backoff_max,
        clock=clock or FakeClock(),
    )


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    """(level, message, peer or source) of the membership's records."""
    return [
        (r.levelname, r.getMessage(), getattr(r, "peer", getattr(r, "source", "")))
        for r in caplog.records
        if r.name == LOGGER
    ]


M1 = Member("10.0.0.1", 8472)
M2 = Member("10.0.0.2", 8472)
M3 = Member("10.0.0.3", 8472)


# -- Member and StaticMembers ------------------------------------------------------------------


def test_member_id_equality_and_order() -> None:
    assert Member("10.0.0.1", 8472).id == "10.0.0.1:8472"
    assert Member("2001:db8::1", 8472).id == "[2001:db8::1]:8472"
    assert Member("10.0.0.1", 1, zone="a") == Member("10.0.0.1", 1, zone="b")
    assert len({Member("10.0.0.1", 1, zone="a"), Member("10.0.0.1", 1)}) == 1
    assert sorted([M2, Member("10.0.0.1", 9000), M1]) == [M1, Member("10.0.0.1", 9000), M2]


async def test_static_members_parsed_sorted_and_deduplicated() -> None:
    source = StaticMembers(
        ["10.0.0.2:8472", "[2001:db8:0::0001]:8472", "10.0.0.1:8472", "10.0.0.2:8472"]
    )
    assert source.name == "static"
    assert await source.resolve() == [M1, M2, Member("2001:db8::1", 8472)]


@pytest.mark.parametrize("bad", ["10.0.0.1", "peer.example:8472", "10.0.0.1:0", "0.0.0.0:8472"])
def test_static_members_reject_bad_addresses(bad: str) -> None:
    with pytest.raises(AddressError):
        StaticMembers([bad])


# -- who is a member ---------------------------------------------------------------------------


def test_is_local_address() -> None:
    assert is_local_address("127.0.0.1")
    assert is_local_address("127.0.0.2")  # all of 127/8 is local on Linux
    assert not is_local_address("192.0.2.7")  # documentation prefixes, never configured
    assert not is_local_address("2001:db8::7")
    assert not is_local_address("peer.example")


async def test_this_node_is_excluded_by_advertised_and_local_address() -> None:
    source = FakeSource(
        "static",
        [
            Member("10.0.0.5", 8472),  # the advertised address
            Member("127.0.0.1", 8472),  # an address of this machine, same port
            Member("10.0.0.5", 9000),  # same host, another port: another node
            Member("127.0.0.1", 9000),  # a second node on this machine
            Member("192.0.2.7", 8472),
        ],
    )
    membership = make(source)
    await membership.refresh()
    assert membership.members() == (
        Member("10.0.0.5", 9000),
        Member("127.0.0.1", 9000),
        Member("192.0.2.7", 8472),
    )
    assert not membership.is_member("10.0.0.6")


async def test_union_across_sources_keeps_a_known_zone() -> None:
    a = FakeSource("static", [M3, M1])
    b = FakeSource("kubernetes:ns/svc", [Member("10.0.0.1", 8472, zone="zone-b"), M2])
    membership = make(a, b)
    await membership.refresh()
    assert membership.members() == (M1, M2, M3)
    assert [m.zone for m in membership.members()] == ["zone-b", "", ""]
    assert membership.live() == (M1, M2, M3)


async def test_is_member_any_port_and_ipv4_mapped() -> None:
    membership = make(FakeSource("static", [Member("10.0.0.1", 9000), Member("2001:db8::1", 1)]))
    assert not membership.is_member("10.0.0.1")  # nothing before the first refresh
    await membership.refresh()
    assert membership.is_member("10.0.0.1")
    assert membership.is_member("::ffff:10.0.0.1")
    assert membership.is_member("2001:db8:0::1")
    assert not membership.is_member("10.0.0.2")
    assert not membership.is_member("not an address")


async def test_failing_source_keeps_its_last_list_and_warns_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    static = FakeSource("static", [M1])
    dns = FakeSource("dns:peers.test", [M2, M3])
    membership = make(static, dns)
    await membership.refresh()
    assert membership.members() == (M1, M2, M3)
    caplog.clear()

    dns.error = "timed out"
    await membership.refresh()
    await membership.refresh()
    assert membership.members() == (M1, M2, M3)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == "membership source failed"
    assert warnings[0].source == "dns:peers.test"  # type: ignore[attr-defined]
    assert warnings[0].error == "dns:peers.test: timed out"  # type: ignore[attr-defined]

    dns.error = None
    dns.members = [M2]
    caplog.clear()
    await membership.refresh()
    assert membership.members() == (M1, M2)
    assert messages(caplog) == [
        ("INFO", "membership source recovered", "dns:peers.test"),
        ("INFO", "peer left", M3.id),
    ]

    dns.error = "SERVFAIL"  # a new streak warns again
    caplog.clear()
    await membership.refresh()
    assert messages(caplog) == [("WARNING", "membership source failed", "dns:peers.test")]


async def test_a_source_that_never_answered_contributes_nothing() -> None:
    broken = FakeSource("kubernetes:ns/svc")
    broken.error = "HTTP 403"
    membership = make(broken, FakeSource("static", [M1]))
    await membership.refresh()
    assert membership.members() == (M1,)


async def test_joined_and_left_logged_and_health_dropped_on_leaving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = FakeClock()
    source = FakeSource("dns:peers.test", [M1, M2])
    membership = make(source, clock=clock)
    await membership.refresh()
    assert messages(caplog) == [("INFO", "peer joined", M1.id), ("INFO", "peer joined", M2.id)]

    membership.mark_down(M2, "connection refused")
    source.members = [M1, M2, M3]
    caplog.clear()
    await membership.refresh()
    assert messages(caplog) == [("INFO", "peer joined", M3.id)]
    assert membership.live() == (M1, M3)  # health survives a refresh while listed

    source.members = [M1, M3]
    caplog.clear()
    await membership.refresh()
    assert messages(caplog) == [("INFO", "peer left", M2.id)]

    source.members = [M1, M2, M3]
    await membership.refresh()
    assert membership.live() == (M1, M2, M3)  # came back: a fresh start
    assert [s["failures"] for s in membership.status()] == [0, 0, 0]


# -- health ------------------------------------------------------------------------------------


async def test_backoff_doubles_and_is_capped() -> None:
    clock = FakeClock()
    membership = make(FakeSource("static", [M1, M2]), clock=clock, backoff=5.0, backoff_max=20.0)
    await membership.refresh()
    expected = [5.0, 10.0, 20.0, 20.0]
    for n, backoff in enumerate(expected, start=1):
        membership.mark_down(M1, f"failure {n}")
        assert membership.live() == (M2,)
        (entry, _) = membership.status()
        assert entry["failures"] == n
        assert entry["downForSec"] == backoff
        clock.now += backoff - 0.001
        assert membership.live() == (M2,), "still down just before the back-off ends"
        clock.now += 0.001
        assert membership.live() == (M1, M2), "live again (on probation) once it has passed"


async def test_repeated_failures_while_down_are_one_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = FakeClock()
    membership = make(FakeSource("static", [M1]), clock=clock)
    await membership.refresh()
    caplog.clear()
    membership.mark_down(M1, "reset")
    clock.now += 1
    membership.mark_down(M1, "timed out")  # a request that was in flight
    (entry,) = membership.status()
    assert entry["failures"] == 1
    assert entry["downForSec"] == 4.0
    assert entry["lastError"] == "timed out"
    downs = [r for r in caplog.records if r.getMessage() == "peer down"]
    assert len(downs) == 1
    assert downs[0].levelname == "WARNING"
    assert (downs[0].peer, downs[0].reason, downs[0].backoff_sec) == (  # type: ignore[attr-defined]
        M1.id,
        "reset",
        5.0,
    )


async def test_probation_failure_doubles_without_a_second_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = FakeClock()
    membership = make(FakeSource("static", [M1]), clock=clock)
    await membership.refresh()
    caplog.clear()
    membership.mark_down(M1, "reset")
    clock.now += 5
    assert membership.live() == (M1,)
    membership.mark_down(M1, "reset again")
    assert membership.status()[0]["downForSec"] == 10.0
    assert [(lvl, msg) for lvl, msg, _ in messages(caplog)] == [
        ("WARNING", "peer down"),
        ("DEBUG", "peer still down"),
    ]


async def test_mark_up_resets_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = FakeClock()
    membership = make(FakeSource("static", [M1]), clock=clock)
    await membership.refresh()
    caplog.clear()
    membership.mark_up(M1)  # already up: nothing to say
    assert messages(caplog) == []

    membership.mark_down(M1, "reset")
    clock.now += 5
    membership.mark_down(M1, "reset")  # probation failure: 10 s
    clock.now += 10
    membership.mark_up(M1)
    membership.mark_up(M1)
    assert [(lvl, msg) for lvl, msg, _ in messages(caplog)].count(("INFO", "peer up")) == 1
    (entry,) = membership.status()
    assert (entry["state"], entry["failures"], entry["lastError"]) == ("up", 0, "reset")

    membership.mark_down(M1, "refused")  # back to the first back-off
    assert membership.status()[0]["downForSec"] == 5.0
    assert [m for _, m, _ in messages(caplog)].count("peer down") == 2


async def test_mark_up_while_down_makes_it_live() -> None:
    membership = make(FakeSource("static", [M1]))
    await membership.refresh()
    membership.mark_down(M1, "reset")
    assert membership.live() == ()
    membership.mark_up(M1)  # a request in flight succeeded after all
    assert membership.live() == (M1,)


async def test_mark_down_of_a_non_member_is_ignored() -> None:
    membership = make(FakeSource("static", [M1]))
    await membership.refresh()
    membership.mark_down(M2, "reset")
    assert membership.live() == (M1,)
    assert [s["peer"] for s in membership.status()] == [M1.id]


async def test_status_shape() -> None:
    clock = FakeClock()
    membership = make(
        FakeSource("static", [M1, Member("2001:db8::2", 8472, zone="zone-a")]), clock=clock
    )
    await membership.refresh()
    membership.mark_down(M1, "connection refused")
    clock.now += 1.5
    status = membership.status()
    assert json.loads(json.dumps(status)) == status
    assert status == [
        {
            "peer": "10.0.0.1:8472",
            "state": "down",
            "zone": "",
            "failures": 1,
            "lastError": "connection refused",
            "downForSec": 3.5,
        },
        {
            "peer": "[2001:db8::2]:8472",
            "state": "up",
            "zone": "zone-a",
            "failures": 0,
            "lastError": "",
        },
    ]


async def test_serve_refreshes_every_refresh_sec(autojump_clock: trio.testing.MockClock) -> None:
    source = FakeSource("dns:peers.test", [M1])
    membership = Membership(
        [source],
        advertise=ADVERTISE,
        refresh_sec=10.0,
        down_backoff_sec=5.0,
        down_backoff_max_sec=20.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.serve)
        assert source.calls == 1
        assert membership.members() == (M1,)  # ready once the first refresh is done
        source.members = [M1, M2]
        await trio.sleep(25)
        assert source.calls == 3
        assert membership.members() == (M1, M2)
        nursery.cancel_scope.cancel()


async def test_default_clock_is_trios(autojump_clock: trio.testing.MockClock) -> None:
    membership = Membership(
        [FakeSource("static", [M1])],
        advertise=ADVERTISE,
        refresh_sec=10.0,
        down_backoff_sec=5.0,
        down_backoff_max_sec=20.0,
    )
    await membership.refresh()
    membership.mark_down(M1, "reset")
    assert membership.live() == ()
    await trio.sleep(5)
    assert membership.live() == (M1,)


async def test_local_address_answer_is_cached_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import snapshotter.peers.members as members_module

    asked: list[str] = []

    def counting(host: str) -> bool:
        asked.append(host)
        return host == "127.0.0.1"

    monkeypatch.setattr(members_module, "is_local_address", counting)
    source = FakeSource("static", [Member("127.0.0.1", 8472), M1, Member("10.0.0.9", 1)])
    membership = make(source)
    await membership.refresh()
    await membership.refresh()
    assert membership.members() == (M1, Member("10.0.0.9", 1))
    assert sorted(asked) == ["10.0.0.1", "127.0.0.1"]  # once each; other ports never asked
