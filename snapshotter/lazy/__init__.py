"""The lazy reader: a layer's bytes fetched span by span, verified, inflated and cached.

- `table`: the span state table of a layer and coalescing of missing spans into requests.
- `fetcher`: span fetching (coalesced, verified Range requests shared by concurrent readers).
- `arriving`: the spans a read waits for, inflated while their Range answer arrives.
- `inflater`: inflation, the memory LRU of inflated spans and the inflated disk tier.
- `readahead`: the read-ahead policy (when and what to fetch ahead of a sequential reader).
- `reader`: `RemoteLayerReader`, the `LayerReader` of lazy layers, and its error boundary.
- `demand`: on-demand activity, which background fetching yields to.
- `background`: background fetch of mounted layers while the link is idle.
- `sources`: the `BlobSource` seam (where span bytes come from) and its registry source.
- `cache`: the span cache on disk (compressed spans) and the inflated tier.

See docs/architecture.md for the life of one FUSE read.
"""

from snapshotter.lazy.background import BackgroundConfig, BackgroundFetcher, BackgroundStatistics
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
    "BackgroundConfig",
    "BackgroundFetcher",
    "BackgroundStatistics",
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
