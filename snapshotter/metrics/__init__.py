"""Prometheus metrics of the daemon (docs/metrics.md).

`DaemonMetrics` holds one registry per daemon and the instruments the parts record in;
`snapshotter.metrics.collectors` reads what the parts already count at scrape time;
`MeteredSource` records what a blob source fetched; the listener (`MetricsApp`,
`bind_metrics`, `serve_metrics`) serves `/metrics` on `[metrics] address`.
"""

from __future__ import annotations

from .instruments import DaemonMetrics, FuseOpRecorder, SourceRecorder, errno_name
from .listener import METRICS_PATH, MetricsApp, bind_metrics, serve_metrics
from .sources import FETCH_ERROR_KINDS, MeteredSource, error_kind

__all__ = [
    "FETCH_ERROR_KINDS",
    "METRICS_PATH",
    "DaemonMetrics",
    "FuseOpRecorder",
    "MeteredSource",
    "MetricsApp",
    "SourceRecorder",
    "bind_metrics",
    "errno_name",
    "error_kind",
    "grpc_recorder_of",
    "serve_metrics",
]


def grpc_recorder_of(mounter: object) -> DaemonMetrics | None:
    """The daemon's metrics when the layer mounter carries them (`metrics`, set by
    `snapshotter.remote.compose` with `[metrics] address`), for the gRPC server."""
    metrics = getattr(mounter, "metrics", None)
    return metrics if isinstance(metrics, DaemonMetrics) else None
