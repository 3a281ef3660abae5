"""A fault-injecting reverse proxy in front of a real registry (chaos tests).

`FaultProxy` forwards every request to `upstream` (a `docker-registry` on loopback) and, for
the requests whose path contains `plan.match` (the blob reads by default), applies the fault
its `FaultPlan` picks for that request's index among them since the plan was set (0-based):

- `status`: answers `Fault.status` (503 by default) without forwarding;
- `throttle`: answers 429 with `Retry-After: Fault.retry_after`;
- `reset`: sends the headers and half the body, then drops the connection with a TCP RST;
- `truncate`: a short answer that looks complete: `Content-Length` of half the body, and that
  half;
- `trickle`: the right answer, `Fault.chunk_bytes` every `Fault.interval_sec`;
- `flip`: the answer with one byte flipped (at a position the plan's seed picks);
- `redirect_dead`: a 307 to the same path on a loopback port nobody listens on;
- `dns`: a 307 to the same path on a host name under `.invalid`, which never resolves.

A plan picks by request index (`by_index`), else with `probability` one of `kinds`, drawn
from `random.Random(f"{seed}:{index}")`: the same seed gives the same faults at the same
indexes whatever the timing of other requests. `FaultProxy.plan` can be swapped at any time
(`clear()` stops the faults); `injected` lists what was done, `times` when each matching
request arrived (monotonic seconds).

Not a registry: answers come from upstream; the proxy holds one answer in memory at a time
per request (blob ranges of a few MiB).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

FaultKind = Literal[
    "status", "throttle", "reset", "truncate", "trickle", "flip", "redirect_dead", "dns"
]
ALL_KINDS: tuple[FaultKind, ...] = (
    "status",
    "throttle",
    "reset",
    "truncate",
    "trickle",
    "flip",
    "redirect_dead",
    "dns",
)
UNRESOLVABLE_HOST = "blobs.sociable-chaos.invalid"
"""A name under `.invalid` (RFC 2606): never resolves, so a request to it fails in DNS."""

_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding"})


@dataclass(frozen=True)
class Fault:
    """One fault (see the module doc); `status` for `status`, `retry_after` (the header's
    value) for `throttle`, `chunk_bytes` and `interval_sec` for `trickle`."""

    kind: FaultKind
    status: int = 503
    retry_after: str = "1"
    chunk_bytes: int = 16 * 1024
    interval_sec: float = 0.02


@dataclass(frozen=True)
class FaultPlan:
    """Which matching request gets which fault: `by_index` first, else with `probability`
    a fault drawn from `kinds` (seeded per request index)."""

    by_index: Mapping[int, Fault] = field(default_factory=dict)
    probability: float = 0.0
    kinds: tuple[Fault, ...] = ()
    seed: int = 0
    match: str = "/blobs/sha256:"

    @classmethod
    def always(cls, fault: Fault, match: str = "/blobs/sha256:") -> FaultPlan:
        """Every matching request gets `fault`."""
        return cls(probability=1.0, kinds=(fault,), match=match)

    @classmethod
    def first(cls, n: int, fault: Fault, match: str = "/blobs/sha256:") -> FaultPlan:
        """The first `n` matching requests get `fault`, the others none."""
        return cls(by_index={i: fault for i in range(n)}, match=match)

    def pick(self, index: int) -> Fault | None:
        fault = self.by_index.get(index)
        if fault is not None:
            return fault
        if self.probability <= 0 or not self.kinds:
            return None
        rng = random.Random(f"{self.seed}:{index}")
        if rng.random() >= self.probability:
            return None
        return rng.choice(self.kinds)

    def flip_at(self, index: int, size: int) -> int:
        """The body offset a `flip` of request `index` changes."""
        return random.Random(f"{self.seed}:{index}:flip").randrange(size)


def closed_port() -> int:
    """A loopback TCP port that was bound and closed: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FaultProxy:
    """The proxy (see the module doc). `start()` binds a loopback port; `stop()` closes it."""

    upstream: str
    plan: FaultPlan = field(default_factory=FaultPlan)
    matched: int = 0
    injected: list[tuple[int, FaultKind, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    port: int = 0
    dead_port: int = field(default_factory=closed_port)
    _plan_start: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: http.server.ThreadingHTTPServer | None = None
    _client: httpx.Client | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def clear(self) -> None:
        """No more faults (requests keep being counted)."""
        self.set_plan(FaultPlan(match=self.plan.match))

    def set_plan(self, plan: FaultPlan) -> None:
        """Use `plan` from the next request on; its indexes count from there."""
        with self._lock:
            self.plan = plan
            self._plan_start = self.matched

    def injected_kinds(self) -> set[str]:
        with self._lock:
            return {kind for _, kind, _ in self.injected}

    def _next(self, path: str) -> tuple[int, Fault | None, FaultPlan] | None:
        """Counts a request; its index under the plan, its fault and the plan when it
        matches the plan. `times` and `injected` use the index since the proxy started."""
        with self._lock:
            plan = self.plan
            if plan.match not in path:
                return None
            index = self.matched - self._plan_start
            self.times.append(time.monotonic())
            fault = plan.pick(index)
            if fault is not None:
                self.injected.append((self.matched, fault.kind, path))
            self.matched += 1
            return index, fault, plan

    def start(self) -> None:
        proxy = self
        client = httpx.Client(base_url=self.upstream, timeout=30.0)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _head(self, status: int, headers: Mapping[str, str], length: int) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _send(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
                self._head(status, headers, len(body))
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _abort(self) -> None:
                """Drop the connection with a RST; nothing more is written."""
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                self.close_connection = True
                self.wfile = io.BytesIO()  # finish() must not write to the dead socket

            def _redirect(self, netloc: str) -> None:
                target = urllib.parse.urlunsplit(("http", netloc, self.path, "", ""))
                self._send(307, {"Location": target}, b"")

            def _handle(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                picked = proxy._next(path)
                fault = picked[1] if picked else None
                if fault is not None:
                    if fault.kind == "status":
                        self._send(fault.status, {}, b"injected failure")
                        return
                    if fault.kind == "throttle":
                        self._send(429, {"Retry-After": fault.retry_after}, b"slow down")
                        return
                    if fault.kind == "redirect_dead":
                        self._redirect(f"127.0.0.1:{proxy.dead_port}")
                        return
                    if fault.kind == "dns":
                        self._redirect(UNRESOLVABLE_HOST)
                        return
                length = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                resp = client.request(self.command, self.path, headers=headers, content=body)
                out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
                if "location" in resp.headers:
                    loc = urllib.parse.urlsplit(resp.headers["location"])
                    if loc.netloc == urllib.parse.urlsplit(proxy.upstream).netloc:
                        out["Location"] = urllib.parse.urlunsplit(
                            ("http", proxy.host, loc.path, loc.query, "")
                        )
                data = resp.content
                if self.command == "HEAD":
                    self._head(resp.status_code, out, int(resp.headers.get("content-length", 0)))
                    return
                if fault is None or resp.status_code not in (200, 206) or not data:
                    self._send(resp.status_code, out, data)
                    return
                assert picked is not None
                self._body_fault(fault, picked[0], picked[2], resp.status_code, out, data)

            def _body_fault(
                self,
                fault: Fault,
                index: int,
                plan: FaultPlan,
                status: int,
                headers: dict[str, str],
                data: bytes,
            ) -> None:
                half = len(data) // 2
                if fault.kind == "flip":
                    at = plan.flip_at(index, len(data))
                    data = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]
                    self._send(status, headers, data)
                elif fault.kind == "truncate":
                    self._send(status, headers, data[:half])
                elif fault.kind == "reset":
                    self._head(status, headers, len(data))
                    with contextlib.suppress(OSError):
                        self.wfile.write(data[:half])
                        self.wfile.flush()
                    self._abort()
                elif fault.kind == "trickle":
                    self._head(status, headers, len(data))
                    try:
                        for pos in range(0, len(data), fault.chunk_bytes):
                            self.wfile.write(data[pos : pos + fault.chunk_bytes])
                            self.wfile.flush()
                            time.sleep(fault.interval_sec)
                    except OSError:  # the client gave up (its timeout)
                        self._abort()
                else:
                    self._send(status, headers, data)

            def _serve(self) -> None:
                try:
                    self._handle()
                except ConnectionError:  # the client went away (a killed daemon, a timeout)
                    self._abort()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _serve

        self._client = client
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        threading.Thread(target=self._httpd.serve_forever, name="fault-proxy", daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._client is not None:
            self._client.close()
            self._client = None


@contextlib.contextmanager
def start_fault_proxy(upstream_url: str, plan: FaultPlan | None = None) -> Iterator[FaultProxy]:
    """A started `FaultProxy` in front of `upstream_url` (`http://host:port`), stopped on
    exit."""
    proxy = FaultProxy(upstream_url, plan or FaultPlan())
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
