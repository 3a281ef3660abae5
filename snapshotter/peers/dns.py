"""Members from DNS: every A and AAAA record of one name (a headless Service, say).

dnspython's async resolver runs natively on trio (its trio backend), so a query holds no
thread. Without `servers` the system's resolver configuration (`/etc/resolv.conf`: servers,
search list, ndots) is read on each resolve, in a worker thread, so a changed file is
picked up; with `servers` only those are asked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from snapshotter.peers.address import AddressError, format_address, parse_address
from snapshotter.peers.members import Member, MembershipError

DNS_PORT = 53


def _parse_server(text: str) -> tuple[str, int]:
    """`"10.96.0.10"` → (that, 53); `"127.0.0.1:5353"`, `"[fd00::a]:53"` → (host, port)."""
    try:
        return ipaddress.ip_address(text).compressed, DNS_PORT
    except ValueError:
        pass
    try:
        return parse_address(text, allow_unspecified=False)
    except AddressError:
        raise AddressError(
            f"DNS server {text!r} is not an IP address (or ADDR:PORT, [ADDR]:PORT)"
        ) from None


class DnsMembers:
    """The addresses `name` resolves to (A and AAAA), each with `port`.

    `servers`: IP addresses (optionally `ADDR:PORT`) to ask instead of the system's
    resolvers; a bad one raises AddressError (a ValueError, one line) here. `timeout_sec`
    bounds one `resolve` (both queries, every server and retry).

    `resolve` answers an empty list when the name does not exist or has neither record (a
    Service without endpoints), and raises MembershipError on a timeout, on servers that
    fail or refuse (SERVFAIL, REFUSED), or when there is no server to ask.
    """

    def __init__(
        self,
        name: str,
        port: int,
        *,
        servers: Sequence[str] = (),
        timeout_sec: float = 2.0,
    ) -> None:
        self.name = f"dns:{name}"
        self._qname = name
        self._port = port
        self._servers = [_parse_server(s) for s in servers]
        self._timeout = timeout_sec
        # fails here, at start-up, when dnspython cannot run on trio
        self._backend = dns.asyncbackend.get_backend("trio")

    def __repr__(self) -> str:
        servers = [format_address(h, p) for h, p in self._servers] or "system"
        return f"<DnsMembers {self._qname!r} port={self._port} servers={servers}>"

    def _resolver(self) -> dns.asyncresolver.Resolver:
        """A resolver for one resolve; reads /etc/resolv.conf without `servers` (blocking)."""
        resolver = dns.asyncresolver.Resolver(configure=not self._servers)
        if self._servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in self._servers]
        resolver.lifetime = self._timeout
        resolver.timeout = self._timeout
        return resolver

    async def resolve(self) -> list[Member]:
        try:
            if self._servers:
                resolver = self._resolver()
            else:
                resolver = await trio.to_thread.run_sync(self._resolver)
        except dns.resolver.NoResolverConfiguration as e:
            raise MembershipError(f"{self.name}: no DNS servers configured ({e})") from e
        except OSError as e:
            raise MembershipError(f"{self.name}: resolver configuration: {e}") from e
        addresses: set[str] = set()
        errors: list[MembershipError] = []
        with trio.move_on_after(self._timeout) as scope:
            async with trio.open_nursery() as nursery:
                for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    nursery.start_soon(self._query, resolver, rdtype, addresses, errors)
        if errors:
            raise errors[0]
        if scope.cancelled_caught:
            raise MembershipError(f"{self.name}: no answer within {self._timeout:g}s")
        return sorted(Member(a, self._port) for a in addresses)

    async def _query(
        self,
        resolver: dns.asyncresolver.Resolver,
        rdtype: dns.rdatatype.RdataType,
        addresses: set[str],
        errors: list[MembershipError],
    ) -> None:
        """One query; its addresses go to `addresses`, a failure to `errors` (so the other
        query is not cancelled and both failures are not wrapped in a group)."""
        kind = dns.rdatatype.to_text(rdtype)
        try:
            answer = await resolver.resolve(
                self._qname, rdtype, raise_on_no_answer=False, search=True, backend=self._backend
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return  # the name does not exist, or has no record of this type
        except dns.exception.Timeout as e:
            reason = f"{kind} query timed out after {self._timeout:g}s"
            errors.append(MembershipError(f"{self.name}: {reason}"))
            errors[-1].__cause__ = e
            return
        except (dns.exception.DNSException, OSError) as e:
            # NoNameservers: every server failed or refused (SERVFAIL, REFUSED)
            errors.append(MembershipError(f"{self.name}: {kind} query failed: {_one_line(e)}"))
            errors[-1].__cause__ = e
            return
        if answer.rrset is not None:
            addresses.update(ipaddress.ip_address(rd.to_text()).compressed for rd in answer.rrset)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
