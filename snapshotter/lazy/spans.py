"""Old import path of the reader's names, kept until every importer uses `snapshotter.lazy`.

New code imports from `snapshotter.lazy` (or the module that defines the name).
"""

from snapshotter.lazy.demand import DemandTracker
from snapshotter.lazy.reader import (
    LayerClosed,
    LayerFetchStatus,
    ReadConfig,
    RemoteLayerReader,
    default_inflate_limiter,
)
from snapshotter.lazy.table import TRANSITIONS, SpanState, SpanStateError, SpanTable, coalesce

__all__ = [
    "TRANSITIONS",
    "DemandTracker",
    "LayerClosed",
    "LayerFetchStatus",
    "ReadConfig",
    "RemoteLayerReader",
    "SpanState",
    "SpanStateError",
    "SpanTable",
    "coalesce",
    "default_inflate_limiter",
]
