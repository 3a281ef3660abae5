"""`PeerClient`: range reads from other nodes' peer listeners (httpx on trio).

Its own HTTP client, separate from the registry client: it carries no registry credentials
(so no code path can send one to a peer), ignores proxy settings from the environment, never
follows redirects, and reads at most the bytes it asked for. Errors are translated once, here,
into the fetch-error tree of `snapshotter.lazy.sources`:

    connection refused or reset, broken or short body      SourceUnavailable
    no connection within connect_timeout, no answer in time FetchTimeout
    404                                                      BlobNotFound
    503 (the owner could not fetch it; alive and honest)     PeerDeclined
    401/403                                                  AccessDenied
    416, a wrong Content-Range, any other status             BadRange
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

import httpx
import trio

from index.digest import Digest
from index.oci.reference import Reference
from index.oci.responses import BodySink
from snapshotter.lazy.sources import (
    AccessDenied,
    BadRange,
    BlobNotFound,
    FetchError,
    FetchTimeout,
    SourceUnavailable,
)

from . import protocol
from .members import Member


class PeerDeclined(SourceUnavailable):
    """The peer answered 503: it could not fetch the range (no credentials for the
    repository, its registry failed, out of time). Not a sign of a broken peer."""


class PeerClient:
    """Range reads from peers. `token`: the cluster's shared secret, sent on every request.
    Close with `aclose`."""

    def __init__(self, *, connect_timeout_sec: float, token: str = "") -> None:
        self._token = token
        self._connect_timeout = connect_timeout_sec
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=connect_timeout_sec),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"<PeerClient connect_timeout={self._connect_timeout}s>"

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        headers = {protocol.LOCAL_HEADER: "1", **extra}
        if self._token:
            headers[protocol.TOKEN_HEADER] = self._token
        return headers

    async def head_blob(
        self, peer: str, ref: Reference, digest: Digest, timeout_sec: float
    ) -> int | None:
        """The size of `digest` in `peer`'s content store; None when it answers that it does
        not hold it (or may not say). Raises FetchTimeout when it does not answer within
        `timeout_sec`, SourceUnavailable when it cannot be reached."""
        url = f"http://{peer}{protocol.blob_path(ref.repository, str(digest))}"
        what = f"{digest} at peer {peer}"
        with trio.move_on_after(timeout_sec):
            try:
                response = await self._http.head(
                    url, headers=self._headers({}), params={"ns": ref.registry}
                )
            except (httpx.HTTPError, OSError) as e:
                raise SourceUnavailable(f"{what}: {type(e).__name__}", source=peer) from e
            length = response.headers.get("content-length", "")
            if response.status_code == 200 and length.isdigit():
                return int(length)
            return None
        raise FetchTimeout(f"{what}: no answer within {timeout_sec} s", source=peer)

    async def stream_blob(
        self, peer: str, ref: Reference, digest: Digest, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        """The bytes `[start, end)` of `digest` from `peer`'s content store, as they come.
        Raises a FetchError (see the module doc); stalls are the caller's to bound."""
        what = f"bytes {start}-{end} of {digest} from peer {peer}"
        source = f"peer:{peer}"
        url = f"http://{peer}{protocol.blob_path(ref.repository, str(digest))}"
        headers = self._headers({"range": protocol.range_header(start, end)})
        try:
            async with self._http.stream(
                "GET", url, headers=headers, params={"ns": ref.registry}
            ) as response:
                if response.status_code != 206:
                    raise _status_error(response.status_code, what, source)
                got = 0
                async for part in response.aiter_raw():
                    got += len(part)
                    if got > end - start:
                        raise BadRange(f"{what}: more than asked for", source=source)
                    yield part
                if got != end - start:
                    raise SourceUnavailable(f"{what}: got {got} bytes", source=source)
        except httpx.TimeoutException as e:
            raise FetchTimeout(f"{what}: {type(e).__name__}", source=source) from e
        except (httpx.HTTPError, OSError) as e:
            raise SourceUnavailable(f"{what}: {type(e).__name__}: {e}", source=source) from e

    async def fetch_range(
        self,
        peer: str,
        *,
        registry: str,
        repository: str,
        layer: Digest,
        ztoc: Digest,
        start: int,
        end: int,
        budget_sec: float,
        fetch: bool = True,
        sink: BodySink | None = None,
    ) -> bytes:
        """Bytes `[start, end)` of blob `layer` from the peer at `peer` (`ADDR:PORT`), within
        `budget_sec` seconds. Unverified: the caller checks them. `sink` sees the body as it
        arrives (`index.oci.responses.BodySink`), exactly the bytes returned only when this
        returns. Raises a `FetchError` (see the module doc)."""
        what = f"bytes {start}-{end} of {layer} from peer {peer}"
        source = f"peer:{peer}"
        headers = {
            "range": protocol.range_header(start, end),
            protocol.ZTOC_HEADER: str(ztoc),
            protocol.BUDGET_HEADER: str(max(1, math.floor(budget_sec * 1000))),
        }
        if fetch:
            headers[protocol.FETCH_HEADER] = "1"
        if self._token:
            headers[protocol.TOKEN_HEADER] = self._token
        url = f"http://{peer}{protocol.blob_path(repository, str(layer))}"
        with trio.move_on_after(budget_sec) as scope:
            try:
                return await self._get(
                    url, headers, {"ns": registry}, start, end, what, source, sink
                )
            except httpx.TimeoutException as e:
                raise FetchTimeout(f"{what}: {type(e).__name__}", source=source) from e
            except (httpx.HTTPError, OSError) as e:
                raise SourceUnavailable(f"{what}: {type(e).__name__}: {e}", source=source) from e
        assert scope.cancelled_caught
        raise FetchTimeout(f"{what}: no answer within {budget_sec} s", source=source)

    async def _get(
        self,
        url: str,
        headers: dict[str, str],
        params: dict[str, str],
        start: int,
        end: int,
        what: str,
        source: str,
        sink: BodySink | None = None,
    ) -> bytes:
        want = end - start
        async with self._http.stream("GET", url, headers=headers, params=params) as response:
            status = response.status_code
            if status != 206:
                raise _status_error(status, what, source)
            length = response.headers.get("content-length")
            if length is not None and length != str(want):
                raise BadRange(f"{what}: Content-Length {length}, want {want}", source=source)
            expected = f"bytes {start}-{end - 1}/"
            if not response.headers.get("content-range", "").startswith(expected):
                raise BadRange(
                    f"{what}: answer for {response.headers.get('content-range')!r}",
                    source=source,
                )
            body = bytearray()
            if sink is not None:
                sink.begin()
            async for part in response.aiter_raw():
                body += part
                if len(body) > want:
                    raise BadRange(f"{what}: more than the {want} bytes asked for", source=source)
                if sink is not None:
                    sink.feed(part)
        if len(body) != want:
            raise SourceUnavailable(f"{what}: got {len(body)} bytes, want {want}", source=source)
        return bytes(body)


class PeerBlobClient:
    """The registry-mirror side of the peer client: whole blobs from other members' content
    stores (`X-Sociable-Local`: they never ask further). Errors as `PeerClient`'s."""

    def __init__(self, client: PeerClient, view: MemberView) -> None:
        self._client = client
        self._view = view

    def __repr__(self) -> str:
        return f"<PeerBlobClient {self._client!r}>"

    async def find(
        self, ref: Reference, digest: Digest, timeout_sec: float
    ) -> tuple[str, int] | None:
        """(peer, size) of the first live member to say it holds `digest`, asking every one
        at once (at most `MAX_ASKED`), within `timeout_sec`; None when none does. A member
        that does not answer or cannot be reached is marked down, so the next lookups skip
        it instead of waiting for it again."""
        members = list(self._view.live())[:MAX_ASKED]
        if not members:
            return None
        found: list[tuple[str, int]] = []
        ask_sec = timeout_sec * 0.75
        async with trio.open_nursery() as nursery:

            async def ask(member: Member) -> None:
                try:  # a little less than the caller's bound, so a silent one is seen
                    size = await self._client.head_blob(member.id, ref, digest, ask_sec)
                except FetchError as e:
                    self._view.mark_down(member, str(e))
                    return
                if size is not None and not found:
                    found.append((member.id, size))
                    nursery.cancel_scope.cancel()

            for member in members:
                nursery.start_soon(ask, member)
        return found[0] if found else None

    async def stream(
        self, peer: str, ref: Reference, digest: Digest, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        async for chunk in self._client.stream_blob(peer, ref, digest, start, end):
            yield chunk


MAX_ASKED = 16
"""Members asked at once whether they hold a blob (registry mirror)."""


class MemberView(Protocol):
    def live(self) -> Sequence[Member]: ...

    def mark_down(self, member: Member, reason: str) -> None: ...


def _status_error(status: int, what: str, source: str) -> FetchError:
    message = f"{what}: HTTP {status}"
    if status == 404:
        return BlobNotFound(message, source=source)
    if status == 503:
        return PeerDeclined(message, source=source)
    if status in (401, 403):
        return AccessDenied(message, source=source)
    return BadRange(message, source=source)
