"""Collectors read at scrape time: values the parts already keep, exported as they are.

Each collector reads one part's own statistics (no bookkeeping of its own), so a scrape
costs a few attribute reads: the span cache (`SpanCache.stats`, both tiers), background
fetch (`BackgroundFetcher.statistics`), the mounted lazy layers (`LazyLayers`), the peers
(`Membership.status`, the listener's and the mirror's statistics). Scrapes run on the trio
thread (the ASGI app of `snapshotter.metrics.listener`), where these objects live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .instruments import PREFIX

if TYPE_CHECKING:
    from snapshotter.lazy.background import BackgroundStatistics
    from snapshotter.lazy.cache import CacheStats
    from snapshotter.peers.node import PeerNode


class _Cache(Protocol):
    """`SpanCache`: its stats and its inflated tier's."""

    def stats(self) -> CacheStats: ...

    @property
    def inflated(self) -> _Tier | None: ...


class _Tier(Protocol):
    def stats(self) -> CacheStats: ...


class CacheCollector(Collector):
    """The span cache, by tier (`span`: compressed spans, `inflated`: the inflated tier)."""

    def __init__(self, cache: _Cache) -> None:
        self._cache = cache

    def __repr__(self) -> str:
        return f"<CacheCollector {self._cache!r}>"

    def collect(self) -> Iterator[Metric]:
        tiers: list[tuple[str, CacheStats]] = [("span", self._cache.stats())]
        inflated = self._cache.inflated
        if inflated is not None:
            tiers.append(("inflated", inflated.stats()))
        size = GaugeMetricFamily(
            PREFIX + "cache_size_bytes", "Bytes held in the span cache, by tier.", labels=["tier"]
        )
        limit = GaugeMetricFamily(
            PREFIX + "cache_max_bytes", "The span cache's bound, by tier.", labels=["tier"]
        )
        entries = GaugeMetricFamily(
            PREFIX + "cache_entries", "Spans held in the span cache, by tier.", labels=["tier"]
        )
        hits = CounterMetricFamily(
            PREFIX + "cache_hits", "Span cache reads that found the span, by tier.", labels=["tier"]
        )
        read = CounterMetricFamily(
            PREFIX + "cache_read_bytes",
            "Bytes served from the span cache (the hits' bytes), by tier.",
            labels=["tier"],
        )
        misses = CounterMetricFamily(
            PREFIX + "cache_misses",
            "Span cache reads that did not find a usable span, by tier.",
            labels=["tier"],
        )
        evictions = CounterMetricFamily(
            PREFIX + "cache_evictions",
            "Spans evicted to stay within the bound, by tier.",
            labels=["tier"],
        )
        for tier, s in tiers:
            size.add_metric([tier], s.bytes)
            limit.add_metric([tier], s.max_bytes)
            entries.add_metric([tier], s.entries)
            hits.add_metric([tier], s.hits)
            read.add_metric([tier], s.hit_bytes)
            misses.add_metric([tier], s.misses)
            evictions.add_metric([tier], s.evictions)
        yield from (size, limit, entries, hits, read, misses, evictions)


class BackgroundCollector(Collector):
    """Background fetch progress (`BackgroundFetcher.statistics`)."""

    def __init__(self, statistics: Callable[[], BackgroundStatistics]) -> None:
        self._statistics = statistics

    def __repr__(self) -> str:
        return "<BackgroundCollector>"

    def collect(self) -> Iterator[Metric]:
        s = self._statistics()
        yield CounterMetricFamily(
            PREFIX + "background_fetch_bytes",
            "Compressed bytes fetched by background fetch.",
            value=s.bytes_fetched,
        )
        yield CounterMetricFamily(
            PREFIX + "background_fetch_steps", "Background fetch steps done.", value=s.steps
        )
        yield CounterMetricFamily(
            PREFIX + "background_fetch_errors", "Background fetch steps failed.", value=s.errors
        )
        yield GaugeMetricFamily(
            PREFIX + "background_layers_pending",
            "Mounted lazy layers background fetch has not completed yet.",
            value=s.layers,
        )
        yield CounterMetricFamily(
            PREFIX + "background_layers_completed",
            "Lazy layers background fetch made complete (every span local).",
            value=s.completed_layers,
        )


class PushCollector(Collector):
    """Small files pushed into the page cache, all connections together
    (`snapshotter.fs.push.Pusher.statistics` of each)."""

    def __init__(self, statistics: Callable[[], Iterable[Mapping[str, int]]]) -> None:
        self._statistics = statistics

    def __repr__(self) -> str:
        return "<PushCollector>"

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, int] = {}
        for stats in self._statistics():
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        yield CounterMetricFamily(
            PREFIX + "fuse_pushed_files",
            "Small files put into the page cache before they were read (no READ for them).",
            value=totals.get("files", 0),
        )
        yield CounterMetricFamily(
            PREFIX + "fuse_pushed_bytes",
            "Bytes of the files pushed into the page cache.",
            value=totals.get("bytes", 0),
        )
        yield CounterMetricFamily(
            PREFIX + "fuse_push_unknown_inodes",
            "Pushes the kernel refused: it did not know the file (not listed or looked up).",
            value=totals.get("unknownInode", 0),
        )


class LayersCollector(Collector):
    """The mounted lazy layers: how many (`len(layers)`)."""

    def __init__(self, layers: Callable[[], int]) -> None:
        self._layers = layers

    def __repr__(self) -> str:
        return "<LayersCollector>"

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PREFIX + "lazy_layers", "Lazy layers mounted now.", value=self._layers()
        )


class PeersView(Protocol):
    """What the peers collector reads (`PeerNode` gives it all; see `peers_view`)."""

    def members(self) -> Sequence[dict[str, object]]:
        """`Membership.status()`: one dict per member with its `state`."""
        ...

    def served_bytes(self) -> int:
        """Bytes the listener sent to peers."""
        ...

    def served(self) -> int:
        """Peer requests answered with bytes."""
        ...

    def mirror_bytes(self) -> int | None:
        """Bytes the registry mirror served, None when the mirror is off."""
        ...


MEMBER_STATES = ("up", "down")


class PeersCollector(Collector):
    """The peers: members by state, what was served to peers and by the registry mirror."""

    def __init__(self, view: PeersView) -> None:
        self._view = view

    def __repr__(self) -> str:
        return f"<PeersCollector {self._view!r}>"

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(MEMBER_STATES, 0)
        for member in self._view.members():
            state = str(member.get("state", ""))
            if state in counts:
                counts[state] += 1
        members = GaugeMetricFamily(
            PREFIX + "peer_members", "Peer members, by state (up, down).", labels=["state"]
        )
        for state, n in counts.items():
            members.add_metric([state], n)
        yield members
        yield CounterMetricFamily(
            PREFIX + "peer_served_bytes",
            "Compressed span bytes sent to peers.",
            value=self._view.served_bytes(),
        )
        yield CounterMetricFamily(
            PREFIX + "peer_served_requests",
            "Peer requests answered with span bytes.",
            value=self._view.served(),
        )
        mirror = self._view.mirror_bytes()
        if mirror is not None:
            yield CounterMetricFamily(
                PREFIX + "mirror_served_bytes",
                "Bytes the registry mirror served (to containerd and to members).",
                value=mirror,
            )


class NodePeersView:
    """The `PeersView` of a `PeerNode` (its listener's statistics once it serves)."""

    def __init__(self, node: PeerNode) -> None:
        self._node = node

    def __repr__(self) -> str:
        return f"<NodePeersView {self._node.settings.self_id}>"

    def members(self) -> Sequence[dict[str, object]]:
        return self._node.membership.status()

    def served_bytes(self) -> int:
        app = self._node.app
        return app.server.stats.bytes_served if app is not None else 0

    def served(self) -> int:
        app = self._node.app
        return app.server.stats.served if app is not None else 0

    def mirror_bytes(self) -> int | None:
        app = self._node.app
        if app is None or app.mirror is None:
            return None
        return app.mirror.stats.bytes_served
