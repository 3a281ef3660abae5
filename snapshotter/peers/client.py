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

import httpx
import trio

from index.digest import Digest
from snapshotter.lazy.sources import (
    AccessDenied,
    BadRange,
    BlobNotFound,
    FetchError,
    FetchTimeout,
    SourceUnavailable,
)

from . import protocol


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
    ) -> bytes:
        """Bytes `[start, end)` of blob `layer` from the peer at `peer` (`ADDR:PORT`), within
        `budget_sec` seconds. Unverified: the caller checks them. Raises a `FetchError` (see
        the module doc)."""
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
                return await self._get(url, headers, {"ns": registry}, start, end, what, source)
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
            async for part in response.aiter_raw():
                body += part
                if len(body) > want:
                    raise BadRange(f"{what}: more than the {want} bytes asked for", source=source)
        if len(body) != want:
            raise SourceUnavailable(f"{what}: got {len(body)} bytes, want {want}", source=source)
        return bytes(body)


def _status_error(status: int, what: str, source: str) -> FetchError:
    message = f"{what}: HTTP {status}"
    if status == 404:
        return BlobNotFound(message, source=source)
    if status == 503:
        return PeerDeclined(message, source=source)
    if status in (401, 403):
        return AccessDenied(message, source=source)
    return BadRange(message, source=source)
