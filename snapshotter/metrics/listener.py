"""The metrics listener: `GET /metrics` on `[metrics] address`, served by hypercorn on trio.

`MetricsApp` answers `GET|HEAD /metrics` with the daemon's registry in Prometheus' text
format (or OpenMetrics when the scraper asks for it), 404 for any other path and 405 for
any other method. The registry is rendered on the trio thread, where the objects the
collectors read live; a scrape costs about a millisecond. The listener is bound at start
(`bind_metrics`: a port in use is a start-up error) and served (`serve_metrics`) in a task
scope its owner closes (`snapshotter.remote.compose`).
"""

from __future__ import annotations

import socket
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from snapshotter.peers.address import parse_address
from snapshotter.peers.listener import (
    Receive,
    Scope,
    Send,
    bind_listener,
    http_request,
    serve_listener,
)

METRICS_PATH: Final = "/metrics"


class MetricsApp:
    """The ASGI application of the metrics listener (see the module doc)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.scrapes = 0

    def __repr__(self) -> str:
        return f"<MetricsApp scrapes={self.scrapes}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await http_request(scope, receive, send):
            return
        method = scope.get("method", "GET")
        if scope.get("path") != METRICS_PATH:
            await _answer(send, 404, b"not found: try /metrics\n", "text/plain")
            return
        if method not in ("GET", "HEAD"):
            await _answer(send, 405, b"method not allowed\n", "text/plain")
            return
        accept = ",".join(
            v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"accept"
        )
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        self.scrapes += 1
        await _answer(send, 200, b"" if method == "HEAD" else body, content_type, len(body))


async def _answer(
    send: Send, status: int, body: bytes, content_type: str, length: int | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(body) if length is None else length).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def bind_metrics(address: str) -> socket.socket:
    """The listening socket of `[metrics] address` (`ADDR:PORT`). Raises OSError (the port
    in use, an address not of this host) or `AddressError` (not an `ADDR:PORT`)."""
    host, port = parse_address(address)
    return bind_listener(host, port)


async def serve_metrics(app: MetricsApp, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until cancelled; the server takes `sock` over."""
    await serve_listener(app, sock, errorlog="snapshotter.metrics.hypercorn")
