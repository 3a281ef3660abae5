"""`DaemonMetrics`: one Prometheus registry per daemon and the instruments the parts record in.

The parts record through small protocols they declare themselves (`fs.fuse.FuseMetrics`,
`snapshots.grpc_server.CallRecorder`, `remote.mounter.MountRecorder`, and the sources
wrapped by `MeteredSource`); `DaemonMetrics` implements all of them, so the composition
root passes the one object around. Values the parts already keep as status counters (the
span cache, background fetch, lazy layers, peers) are read at scrape time by the
collectors of `snapshotter.metrics.collectors` registered with `register`.

Not the global default registry: tests run several daemons in one process, and a daemon's
metrics must not mix with another's. Label values come from small fixed sets (FUSE op
names, errno names, gRPC methods and codes, source kinds, error kinds, fallback reasons);
never a digest, a path or a span.

Cost: a labelled child is looked up once (per FUSE op when the adapter starts, per gRPC
(method, code) and per source on first use) and kept; recording is one histogram
`observe` (about 1 µs) and, on failure, one counter `inc`.

Units: seconds, bytes (Prometheus base units).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from snapshotter.lazy.sources import BlobSource

PREFIX: Final = "sociable_"

FUSE_BUCKETS_SEC: Final = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Buckets of FUSE op latency, in seconds: from 50 µs (a lookup answered from memory) to
10 s (a read waiting for a slow registry)."""

FETCH_BUCKETS_SEC: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
"""Buckets of a source's fetch latency (one coalesced Range request, retries included)."""

GRPC_BUCKETS_SEC: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Buckets of Snapshots API call latency (Stat in well under 1 ms, a lazy Prepare in
seconds)."""


def errno_name(code: int) -> str:
    """`ENOENT` for 2; `E<code>` for a number the platform does not name."""
    return errno.errorcode.get(code, f"E{code}")


class FuseOpRecorder:
    """The instruments of one FUSE operation (see `DaemonMetrics.fuse_op`)."""

    __slots__ = ("_by_errno", "_errors", "_lock", "_observe", "_op")

    def __init__(self, op: str, latency: Histogram, errors: Counter) -> None:
        self._op = op
        self._observe = latency.labels(op).observe
        self._errors = errors
        self._by_errno: dict[int, Counter] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FuseOpRecorder {self._op}>"

    def done(self, seconds: float) -> None:
        """The op answered after `seconds`."""
        self._observe(seconds)

    def failed(self, seconds: float, code: int) -> None:
        """The op answered the errno `code` after `seconds`."""
        self._observe(seconds)
        child = self._by_errno.get(code)
        if child is None:
            with self._lock:
                child = self._by_errno.setdefault(
                    code, self._errors.labels(self._op, errno_name(code))
                )
        child.inc()


class SourceRecorder:
    """The instruments of one kind of source (`registry`, `peer`), see `MeteredSource`."""

    __slots__ = ("_bytes", "_errors", "_kind", "_kinds", "_lock", "_observe")

    def __init__(self, kind: str, fetched: Counter, latency: Histogram, errors: Counter) -> None:
        self._kind = kind
        self._bytes = fetched.labels(kind)
        self._observe = latency.labels(kind).observe
        self._errors = errors
        self._kinds: dict[str, Counter] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SourceRecorder {self._kind}>"

    def fetched(self, size: int, seconds: float) -> None:
        """A fetch delivered `size` verified bytes after `seconds`."""
        self._bytes.inc(size)
        self._observe(seconds)

    def failed(self, error_kind: str, seconds: float) -> None:
        """A fetch failed with `error_kind` (`FETCH_ERROR_KINDS`) after `seconds`."""
        self._observe(seconds)
        child = self._kinds.get(error_kind)
        if child is None:
            with self._lock:
                child = self._kinds.setdefault(
                    error_kind, self._errors.labels(self._kind, error_kind)
                )
        child.inc()


class DaemonMetrics:
    """The daemon's registry and instruments (see the module doc). Thread-safe: gRPC
    handlers record from grpcio's threads, everything else from the trio thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._fuse_latency = Histogram(
            PREFIX + "fuse_operation_seconds",
            "Latency of FUSE operations answered by the layer filesystem, by operation.",
            ["op"],
            buckets=FUSE_BUCKETS_SEC,
            registry=r,
        )
        self._fuse_errors = Counter(
            PREFIX + "fuse_operation_errors_total",
            "FUSE operations answered with an error, by operation and errno name.",
            ["op", "errno"],
            registry=r,
        )
        self._fetched = Counter(
            PREFIX + "fetch_bytes_total",
            "Compressed layer bytes fetched and verified, by source (registry: hosts.toml "
            "mirrors and the registry; peer: other nodes).",
            ["source"],
            registry=r,
        )
        self._fetch_latency = Histogram(
            PREFIX + "fetch_seconds",
            "Latency of one source's fetch of a run of spans (one Range request, its "
            "retries included), by source.",
            ["source"],
            buckets=FETCH_BUCKETS_SEC,
            registry=r,
        )
        self._fetch_errors = Counter(
            PREFIX + "fetch_errors_total",
            "Failed fetches of a run of spans, by source and kind of error.",
            ["source", "kind"],
            registry=r,
        )
        self._mounts = Counter(
            PREFIX + "layer_mounts_total",
            "Layers the snapshotter was asked to prepare, by result: remote (mounted lazily), "
            "local (unpacked here), declined (left to containerd).",
            ["result"],
            registry=r,
        )
        self._fallbacks = Counter(
            PREFIX + "layer_fallbacks_total",
            "Layers not mounted lazily, by reason (docs/architecture.md, the fallback matrix).",
            ["reason"],
            registry=r,
        )
        self._grpc_calls = Counter(
            PREFIX + "grpc_calls_total",
            "Snapshots API calls, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self._grpc_latency = Histogram(
            PREFIX + "grpc_call_seconds",
            "Latency of Snapshots API calls, by method.",
            ["method"],
            buckets=GRPC_BUCKETS_SEC,
            registry=r,
        )
        self._lock = threading.Lock()
        self._sources: dict[str, SourceRecorder] = {}
        self._calls: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._mount_children: dict[str, Counter] = {}
        self._fallback_children: dict[str, Counter] = {}

    def __repr__(self) -> str:
        return f"<DaemonMetrics sources={sorted(self._sources)} calls={len(self._calls)}>"

    def register(self, collectors: Iterable[Collector]) -> None:
        """Add collectors read at scrape time (`snapshotter.metrics.collectors`)."""
        for collector in collectors:
            self.registry.register(collector)

    # -- FUSE (`snapshotter.fs.fuse.FuseMetrics`) ------------------------------------------------

    def fuse_op(self, op: str) -> FuseOpRecorder:
        """The recorder of FUSE operation `op` (the adapter asks once per op)."""
        return FuseOpRecorder(op, self._fuse_latency, self._fuse_errors)

    # -- sources (`MeteredSource`) ----------------------------------------------------------------

    def source(self, kind: str) -> SourceRecorder:
        """The recorder of the sources of `kind` (`registry`, `peer`), shared by all layers."""
        with self._lock:
            rec = self._sources.get(kind)
            if rec is None:
                rec = self._sources[kind] = SourceRecorder(
                    kind, self._fetched, self._fetch_latency, self._fetch_errors
                )
            return rec

    def metered(self, source: BlobSource, kind: str) -> BlobSource:
        """`source` with its fetches recorded under `kind` (`remote.layers.SourceMeter`)."""
        from .sources import MeteredSource

        return MeteredSource(source, self.source(kind))

    # -- the mounter (`snapshotter.remote.mounter.MountRecorder`) ---------------------------------

    def mount_result(self, result: str) -> None:
        """A Prepare's layer ended `result` (`remote`, `local`, `declined`)."""
        child = self._mount_children.get(result)
        if child is None:
            with self._lock:
                child = self._mount_children.setdefault(result, self._mounts.labels(result))
        child.inc()

    def fallback(self, reason: str) -> None:
        """A layer fell back for `reason` (`RemoteError.reason`)."""
        child = self._fallback_children.get(reason)
        if child is None:
            with self._lock:
                child = self._fallback_children.setdefault(reason, self._fallbacks.labels(reason))
        child.inc()

    # -- gRPC (`snapshotter.snapshots.grpc_server.CallRecorder`) ----------------------------------

    def grpc_call(self, method: str, code: str, seconds: float) -> None:
        """A Snapshots API call of `method` answered `code` (`OK`, `NOT_FOUND`, ...) after
        `seconds`."""
        key = (method, code)
        pair = self._calls.get(key)
        if pair is None:
            with self._lock:
                pair = self._calls.setdefault(
                    key, (self._grpc_calls.labels(method, code), self._grpc_latency.labels(method))
                )
        pair[0].inc()
        pair[1].observe(seconds)
