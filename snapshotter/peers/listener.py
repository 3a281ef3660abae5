"""The peer listener: one TCP port per node, the owner protocol and a registry mirror.

A small ASGI application (`PeerApp`) served by hypercorn on trio (`serve_listener`):

    GET|HEAD /healthz                                     200 `ok`: the daemon serves (the
                                                          readiness probe of the DaemonSet in
                                                          deploy/kubernetes; no token needed)
    GET|HEAD /v2/                                         200 (the registry API check)
    GET      /v2/<name>/blobs/<digest>?ns=<registry>      with X-Sociable-Ztoc: a span-aligned
                                                          Range for a peer (see protocol)
    GET|HEAD /v2/<name>/blobs/<digest>?ns=<registry>      otherwise: the registry mirror, a
                                                          whole blob or one Range (200, 206,
                                                          416), `snapshotter.mirror.serve`
    GET|HEAD /v2/<name>/manifests/<ref>?ns=<registry>     the mirror, public repositories only;
                                                          a tag from this node's image store

Who may ask: current members and this node's own addresses, unless `allow_non_members`
(so a pod in the cluster network cannot read layers through it), and, when the cluster has
a shared token, only requests carrying it (this node's own containerd needs none, nor does
`/healthz`: kubelet probes a host-network pod at the node's own address, and the answer
says nothing but `ok`). At most
`max_uploads` peer requests are served at once (the rest wait, within their budget), and the
bytes sent to peers are held to `upload_rate_bytes_per_sec`, so serving peers never starves
the node's own reads. Span answers are logged at debug level (keys `client`, `path`,
`status`, `bytes`, `ms`), mirror answers at info level (`path`, `status`, `source`: content,
peer or none, `ms`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import trio

from index.digest import Digest, DigestError
from index.oci.reference import Reference
from snapshotter.mirror.serve import MirrorError, MirrorService

from . import protocol
from .serving import ServeError, SpanServer

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SEND_PIECE: Final = 256 * 1024
"""Bytes per body message (and per rate-limit step)."""

HEALTH_PATH: Final = "/healthz"
"""The readiness path: `ok` while the listener serves (the daemon is up with peers on)."""

_BLOB_PATH: Final = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-zA-Z0-9=_-]+)$")
_MANIFEST_PATH: Final = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")


class TokenBucket:
    """A byte-rate limit: `take(n)` waits until `n` bytes may go (0 = unlimited)."""

    def __init__(self, rate_bytes_per_sec: int) -> None:
        self._rate = rate_bytes_per_sec
        self._next = 0.0

    async def take(self, n: int) -> None:
        if self._rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + n / self._rate
        if start > now:
            await trio.sleep(start - now)


class PeerApp:
    """The ASGI application of the peer listener (see the module doc)."""

    def __init__(
        self,
        server: SpanServer,
        *,
        is_allowed: Callable[[str], bool],
        token: str,
        max_uploads: int,
        upload_rate_bytes_per_sec: int,
        max_budget_sec: float,
        mirror: MirrorService | None = None,
        is_local: Callable[[str], bool] = lambda host: False,
    ) -> None:
        self.server = server
        self.mirror = mirror
        self._is_local = is_local
        self._is_allowed = is_allowed
        self._token = token
        self._uploads = trio.CapacityLimiter(max_uploads)
        self._bucket = TokenBucket(upload_rate_bytes_per_sec)
        self._max_budget = max_budget_sec
        self.forbidden = 0

    def __repr__(self) -> str:
        return f"<PeerApp {self.server!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await http_request(scope, receive, send):
            return
        t0 = time.monotonic()
        status, sent = await self._handle(scope, send)
        log.debug(
            "peer request",
            extra={
                "client": (scope.get("client") or ("?",))[0],
                "path": scope.get("path", ""),
                "status": status,
                "bytes": sent,
                "ms": round((time.monotonic() - t0) * 1000),
            },
        )

    async def _handle(self, scope: Scope, send: Send) -> tuple[int, int]:
        method = scope.get("method", "GET")
        path: str = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = (scope.get("client") or ("",))[0]
        allowed = self._is_allowed(client)
        if allowed and path == HEALTH_PATH:
            if method not in ("GET", "HEAD"):
                return await _answer(send, 405, b""), 0
            return await _answer(send, 200, b"ok\n" if method == "GET" else b""), 0
        if not allowed or not (self._is_local(client) or self._token_ok(headers)):
            self.forbidden += 1
            return await _answer(send, 403, b"not a member\n"), 0
        if path in ("/v2/", "/v2"):
            if method not in ("GET", "HEAD"):
                return await _answer(send, 405, b""), 0
            return await _answer(send, 200, b"{}" if method == "GET" else b""), 0
        manifest = _MANIFEST_PATH.match(path)
        match = _BLOB_PATH.match(path)
        if (match is None and manifest is None) or method not in ("GET", "HEAD"):
            return await _answer(send, 404, b"not found\n"), 0
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        ns = query.get("ns", [""])[0]
        if not ns:
            return await _answer(send, 404, b"no ns\n"), 0
        if manifest is not None:
            return await self._manifest(
                send, method, Reference(ns, manifest["name"]), manifest["reference"]
            )
        assert match is not None
        try:
            digest = Digest(match["digest"])
            ztoc = (
                Digest(headers[protocol.ZTOC_HEADER]) if protocol.ZTOC_HEADER in headers else None
            )
            ref = Reference(ns, match["name"])
        except (DigestError, ValueError):
            return await _answer(send, 404, b"bad name or digest\n"), 0
        if ztoc is None:
            return await self._mirror_blob(send, method, ref, digest, headers)
        if method != "GET":
            return await _answer(send, 404, b"span ranges are read with GET\n"), 0
        wanted = protocol.parse_range(headers.get("range", ""))
        if wanted is None or wanted[1] < 0:
            return await _answer(send, 404, b"only span ranges are served\n"), 0
        start, end = wanted
        budget = self._budget(headers)
        # answer "could not fetch" (503) a little before the requester gives up, so it moves
        # on without taking this node for broken
        deadline = trio.current_time() + max(0.05, budget - min(0.5, budget * 0.1))
        try:
            with trio.move_on_at(deadline) as waited:
                await self._uploads.acquire()
            if waited.cancelled_caught:
                return await _answer(send, 503, b"busy\n"), 0
            try:
                data = await self.server.serve_range(
                    ref,
                    digest,
                    ztoc,
                    start,
                    end,
                    fetch=headers.get(protocol.FETCH_HEADER) == "1",
                    budget_sec=max(0.001, deadline - trio.current_time()),
                )
                await self._send_bytes(send, data, start, end, digest)
            finally:
                self._uploads.release()
        except ServeError as e:
            log.debug("peer request refused", extra={"status": e.status, "error": str(e)})
            return await _answer(send, e.status, str(e).encode() + b"\n"), 0
        return 206, len(data)

    async def _mirror_blob(
        self, send: Send, method: str, ref: Reference, digest: Digest, headers: dict[str, str]
    ) -> tuple[int, int]:
        """A registry-mirror blob read (containerd's, or a member's mirror asking this node's
        content store): full or one `Range`, HEAD or GET (see `snapshotter.mirror.serve`)."""
        if self.mirror is None:
            return await _answer(send, 404, b"no registry mirror here\n"), 0
        local_only = headers.get(protocol.LOCAL_HEADER) == "1"
        t0 = time.monotonic()
        try:
            where = await self.mirror.locate(ref, digest, local_only=local_only)
        except MirrorError as e:
            _log_mirror(ref, digest, e.status, "", t0)
            return await _answer(send, e.status, str(e).encode() + b"\n"), 0
        size = where.size
        status, start, end = 200, 0, size
        value = headers.get("range", "")
        if value.partition("=")[0].strip().lower() == "bytes":  # other units are ignored
            wanted = _blob_range(value, size)
            if wanted is None:
                _log_mirror(ref, digest, 416, where.source, t0)
                return await _answer(
                    send, 416, b"", [(b"content-range", f"bytes */{size}".encode())]
                ), 0
            (start, end), status = wanted, 206
        response_headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(end - start).encode()),
            (b"accept-ranges", b"bytes"),
            (protocol.DIGEST_HEADER.encode(), str(digest).encode()),
            (b"docker-distribution-api-version", b"registry/2.0"),
        ]
        if status == 206:
            response_headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
        start_message = {
            "type": "http.response.start",
            "status": status,
            "headers": response_headers,
        }
        if method == "HEAD":
            await send(start_message)
            await send({"type": "http.response.body", "body": b""})
            _log_mirror(ref, digest, status, where.source, t0)
            return status, 0
        sent = 0
        async with contextlib.aclosing(self.mirror.body(ref, digest, where, start, end)) as chunks:
            # the first bytes come before the answer starts: a source that fails at once (a
            # member whose blob went away since the lookup) is a miss, and containerd asks its
            # next host; an answer cut after its start fails containerd's whole pull
            try:
                chunk = await anext(chunks, None)
            except MirrorError as e:
                self.mirror.stats.not_found += 1
                _log_mirror(ref, digest, 404, where.source, t0)
                return await _answer(send, 404, str(e).encode() + b"\n"), 0
            await send(start_message)
            try:
                while chunk is not None:
                    if local_only:  # another member's pull: the upload limits apply
                        await self._bucket.take(len(chunk))
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent += len(chunk)
                    chunk = await anext(chunks, None)
            except MirrorError as e:  # cut the answer: containerd sees a broken body
                _log_mirror(ref, digest, e.status, where.source, t0)
                raise
        await send({"type": "http.response.body", "body": b""})
        _log_mirror(ref, digest, status, where.source, t0)
        return status, sent

    async def _manifest(
        self, send: Send, method: str, ref: Reference, reference: str
    ) -> tuple[int, int]:
        if self.mirror is None:
            return await _answer(send, 404, b"no registry mirror here\n"), 0
        t0 = time.monotonic()
        try:
            data, media_type, digest = await self.mirror.manifest(ref, reference)
        except MirrorError as e:
            log.info(
                "mirror request",
                extra={
                    "path": f"{ref.name}/manifests/{reference}",
                    "status": e.status,
                    "source": "",
                    "ms": round((time.monotonic() - t0) * 1000),
                },
            )
            return await _answer(send, e.status, str(e).encode() + b"\n"), 0
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", media_type.encode()),
                    (b"content-length", str(len(data)).encode()),
                    (protocol.DIGEST_HEADER.encode(), str(digest).encode()),
                    (b"docker-distribution-api-version", b"registry/2.0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else data})
        log.info(
            "mirror request",
            extra={
                "path": f"{ref.name}/manifests/{reference}",
                "status": 200,
                "source": "content",
                "ms": round((time.monotonic() - t0) * 1000),
            },
        )
        return 200, len(data)

    def _budget(self, headers: dict[str, str]) -> float:
        text = headers.get(protocol.BUDGET_HEADER, "")
        if text.isdigit():
            return min(self._max_budget, max(1, int(text)) / 1000.0)
        return self._max_budget

    def _token_ok(self, headers: dict[str, str]) -> bool:
        if not self._token:
            return True
        return hmac.compare_digest(
            headers.get(protocol.TOKEN_HEADER, "").encode(), self._token.encode()
        )

    async def _send_bytes(
        self, send: Send, data: bytes, start: int, end: int, digest: Digest
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 206,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(data)).encode()),
                    (b"content-range", f"bytes {start}-{end - 1}/*".encode()),
                    (protocol.DIGEST_HEADER.encode(), str(digest).encode()),
                ],
            }
        )
        view = memoryview(data)
        for offset in range(0, len(data), SEND_PIECE):
            piece = view[offset : offset + SEND_PIECE]
            await self._bucket.take(len(piece))
            await send(
                {
                    "type": "http.response.body",
                    "body": bytes(piece),
                    "more_body": offset + SEND_PIECE < len(data),
                }
            )


def _blob_range(value: str, size: int) -> tuple[int, int] | None:
    """The bytes `[start, end)` of a `size`-byte blob that a `Range: bytes=...` value asks
    for: `S-E` (an end past the blob clipped), `S-`, or the last N bytes `-N`; None (answer
    416) when none can be served: a start at or past the end, `-0`, several ranges, garbage."""
    first, sep, last = value.partition("=")[2].strip().partition("-")
    if sep and not first.strip() and last.strip().isdigit():
        count = int(last)
        return (max(0, size - count), size) if count and size else None
    wanted = protocol.parse_range(value)
    if wanted is None or wanted[0] >= size:
        return None
    return wanted[0], size if wanted[1] < 0 else min(wanted[1], size)


def _log_mirror(ref: Reference, digest: Digest, status: int, source: str, t0: float) -> None:
    log.info(
        "mirror request",
        extra={
            "path": f"{ref.name}/blobs/{digest}",
            "status": status,
            "source": source,
            "ms": round((time.monotonic() - t0) * 1000),
        },
    )


async def _answer(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"docker-distribution-api-version", b"registry/2.0"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return status


SEND_TIMEOUT_SEC: Final = 10.0
"""Longest the kernel keeps unacknowledged answer bytes for a peer that stopped
acknowledging (`TCP_USER_TIMEOUT`, inherited by every accepted connection) before it drops
the connection. hypercorn shields its sends from cancellation, so without it an answer to a
peer whose link went down would hold its upload slot, and the daemon's shutdown, for the
kernel's retransmission limit (about 15 minutes)."""


def bind_listener(
    host: str, port: int, *, send_timeout_sec: float = SEND_TIMEOUT_SEC
) -> socket.socket:
    """A listening TCP socket on (host, port) — bound now, so a port in use is a start-up
    error and not a failing task — whose connections give up on a peer that stops
    acknowledging after `send_timeout_sec`. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout_sec * 1000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def http_request(scope: Scope, receive: Receive, send: Send) -> bool:
    """Whether `scope` is an HTTP request for the app to answer. ASGI's lifespan protocol
    (start-up and shutdown) is answered here, and any other scope type ignored."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return False
    return bool(scope["type"] == "http")


async def serve_listener(
    app: AsgiApp, sock: socket.socket, *, errorlog: str = "snapshotter.peers.hypercorn"
) -> None:
    """Serve `app` (this module's `PeerApp`, or the metrics app) on the bound `sock` until
    cancelled (hypercorn, HTTP/1.1), logging hypercorn's errors to logger `errorlog`. The
    server takes the socket over (`sock` is detached at once) and closes it when it stops."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    # hypercorn wraps the descriptor in a socket of its own and closes that one: `sock` must
    # let go of it, or its own close would later hit whatever reuses the descriptor number
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.include_server_header = False  # answers name no software or version
    config.errorlog = logging.getLogger(errorlog)
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1
    await serve(app, config, mode="asgi")  # type: ignore[arg-type]
