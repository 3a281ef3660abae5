"""DNS membership against a real dnsmasq on 127.0.0.1: A and AAAA records, records that
change while the test runs (an `--addn-hosts` file re-read on SIGHUP), NXDOMAIN, a refusing
server and a dead one."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.resolver
import pytest
import trio

from snapshotter.peers.address import AddressError
from snapshotter.peers.dns import DnsMembers
from snapshotter.peers.members import Member, Membership, MembershipError
from tests.support.registry import free_port

pytestmark = pytest.mark.root

DNSMASQ = "/usr/sbin/dnsmasq"
PORT = 8472


@dataclass
class Dnsmasq:
    proc: subprocess.Popen[bytes]
    port: int
    hosts: Path
    log: Path

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_hosts(self, lines: list[str]) -> None:
        """Replaces the `--addn-hosts` file and makes dnsmasq re-read it; returns once a
        query of `peers.test` sees the new A records."""
        self.hosts.write_text("".join(f"{line}\n" for line in lines))
        self.proc.send_signal(signal.SIGHUP)
        want = sorted(ln.split()[0] for ln in lines if "." in ln.split()[0] and "peers.test" in ln)
        deadline = time.monotonic() + 5
        while sorted(query(self.port, "peers.test", "A")) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"dnsmasq did not reload: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def query(port: int, name: str, rdtype: str, *, lifetime: float = 1.0) -> list[str]:
    """A synchronous query (the test's own view of what dnsmasq answers)."""
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.lifetime = lifetime
    try:
        return [rd.to_text() for rd in r.resolve(name, rdtype)]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []


def start_dnsmasq(directory: Path, hosts: list[str]) -> Dnsmasq:
    hosts_file = directory / "hosts"
    hosts_file.write_text("".join(f"{line}\n" for line in hosts))
    log = directory / "dnsmasq.log"
    for _ in range(3):  # the free port may be taken in between
        port = free_port()
        args = [
            DNSMASQ,
            "--no-daemon",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--user=root",
            "--local=/test/",  # names under test. are answered here: NXDOMAIN, not REFUSED
            f"--addn-hosts={hosts_file}",
            "--host-record=static.test,10.9.1.1",
            "--host-record=static.test,10.9.1.2,2001:db8::12",
            "--log-facility=-",
            "--log-queries",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        server = Dnsmasq(proc, port, hosts_file, log)
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if query(port, "static.test", "A", lifetime=0.2):
                    return server
            except dns.exception.DNSException:
                pass
            time.sleep(0.05)
        server.stop()
    raise AssertionError(f"dnsmasq did not start: {log.read_text()[-2000:]}")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    if not os.access(DNSMASQ, os.X_OK):
        pytest.skip(f"{DNSMASQ} not installed (Debian: dnsmasq-base)")
    server = start_dnsmasq(
        tmp_path, ["10.9.0.1 peers.test", "10.9.0.2 peers.test", "2001:db8::1 peers.test"]
    )
    try:
        yield server
    finally:
        server.stop()


async def test_a_and_aaaa_records(dnsmasq: Dnsmasq) -> None:
    source = DnsMembers("peers.test", PORT, servers=[dnsmasq.server])
    assert source.name == "dns:peers.test"
    assert await source.resolve() == [
        Member("10.9.0.1", PORT),
        Member("10.9.0.2", PORT),
        Member("2001:db8::1", PORT),
    ]
    static = DnsMembers("static.test", 9000, servers=[dnsmasq.server])
    assert await static.resolve() == [
        Member("10.9.1.1", 9000),
        Member("10.9.1.2", 9000),
        Member("2001:db8::12", 9000),
    ]


async def test_only_a_or_only_aaaa(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts(["10.9.0.1 peers.test", "2001:db8::5 six.test"])
    source = DnsMembers("peers.test.", PORT, servers=[dnsmasq.server])
    assert await source.resolve() == [Member("10.9.0.1", PORT)]
    six = DnsMembers("six.test", PORT, servers=[dnsmasq.server])
    assert await six.resolve() == [Member("2001:db8::5", PORT)]


async def test_nxdomain_is_no_members(dnsmasq: Dnsmasq) -> None:
    source = DnsMembers("absent.test", PORT, servers=[dnsmasq.server])
    assert await source.resolve() == []


async def test_refusing_server_is_an_error(dnsmasq: Dnsmasq) -> None:
    # outside --local=/test/ and without upstream servers, dnsmasq answers REFUSED
    source = DnsMembers("peers.example", PORT, servers=[dnsmasq.server], timeout_sec=2.0)
    start = trio.current_time()
    with pytest.raises(MembershipError) as info:
        await source.resolve()
    assert trio.current_time() - start < 2.5
    assert str(info.value).startswith("dns:peers.example: ")
    assert "REFUSED" in str(info.value)
    assert "\n" not in str(info.value)


async def test_dead_server_fails_within_the_timeout() -> None:
    source = DnsMembers("peers.test", PORT, servers=[f"127.0.0.1:{free_port()}"], timeout_sec=1.0)
    start = trio.current_time()
    with pytest.raises(MembershipError, match=r"^dns:peers\.test: "):
        await source.resolve()
    assert trio.current_time() - start < 2.0


def test_bad_server_is_a_value_error() -> None:
    with pytest.raises(AddressError, match=r"'dns\.example' is not an IP address"):
        DnsMembers("peers.test", PORT, servers=["dns.example"])
    assert "servers=['[::1]:5353']" in repr(DnsMembers("p", PORT, servers=["[::1]:5353"]))


async def test_membership_follows_the_records(
    dnsmasq: Dnsmasq, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="snapshotter.peers.members")
    membership = Membership(
        [DnsMembers("peers.test", PORT, servers=[dnsmasq.server], timeout_sec=1.0)],
        advertise=("10.9.0.2", PORT),  # this node is one of the records
        refresh_sec=10.0,
        down_backoff_sec=5.0,
        down_backoff_max_sec=60.0,
    )
    await membership.refresh()
    assert membership.members() == (Member("10.9.0.1", PORT), Member("2001:db8::1", PORT))

    membership.mark_down(Member("2001:db8::1", PORT), "connection refused")
    dnsmasq.set_hosts(
        [
            "10.9.0.2 peers.test",
            "10.9.0.3 peers.test",  # a node joined
            "2001:db8::1 peers.test",  # 10.9.0.1 left
        ]
    )
    caplog.clear()
    await membership.refresh()
    assert membership.members() == (Member("10.9.0.3", PORT), Member("2001:db8::1", PORT))
    assert membership.live() == (Member("10.9.0.3", PORT),)  # still down after the refresh
    events = sorted((r.getMessage(), r.peer) for r in caplog.records)  # type: ignore[attr-defined]
    assert events == [("peer joined", "10.9.0.3:8472"), ("peer left", "10.9.0.1:8472")]

    dnsmasq.stop()  # the server goes away: the last good list stays
    caplog.clear()
    await membership.refresh()
    assert membership.members() == (Member("10.9.0.3", PORT), Member("2001:db8::1", PORT))
    (warning,) = caplog.records
    assert warning.getMessage() == "membership source failed"
    assert warning.source == "dns:peers.test"  # type: ignore[attr-defined]
