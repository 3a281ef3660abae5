"""`PeerSource` against real peers on loopback: real listeners (hypercorn over a
`SpanServer`) as good owners, raw TCP peers that misbehave (wrong bytes, 404/503, silence, a
short body), a closed port; a fake membership view records mark_down / mark_up.

A good owner's bytes are verified and returned (marked up); a failing owner is marked down
and the next owner asked, within one budget for a silent one and at once for a refused one;
a 503 or a 403 moves on without marking down; owners after this node, or every owner while
this node serves a peer, are only asked whether they hold the range (a 404 then is no
failure); and a `ChainSource[PeerSource, registry]` returns the right bytes from the
registry stand-in whatever the peers do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio

from index.model import CompressedOffset, SpanId
from index.zinfo import SpanMap
from snapshotter.lazy.sources import (
    BlobNotFound,
    ChainSource,
    FetchError,
    SourceUnavailable,
)
from snapshotter.peers.client import PeerClient
from snapshotter.peers.members import Member
from snapshotter.peers.source import (
    SERVING_PEER,
    PeerFetchStatistics,
    PeerSettings,
    PeerSource,
)
from tests.support.lazylayer import Layer, MemorySource
from tests.support.peers import (
    REF,
    ZTOC_DIGEST,
    Behaviour,
    FakeView,
    arrange,
    closed_port,
    open_fake_peer,
    open_listener,
    span_check,
    span_range,
)

CHUNK = 64 * 1024
"""Small chunks: each span of the test layer is its own chunk, so a test can pick the
chunk whose owners come in the order it needs."""
BUDGET = 0.5


@pytest.fixture(scope="module")
def layer() -> Layer:
    return Layer()


@pytest.fixture(scope="module")
def spans(layer: Layer) -> SpanMap:
    return SpanMap.from_ztoc(layer.ztoc)


@contextlib.asynccontextmanager
async def peer_source(
    layer: Layer,
    spans: SpanMap,
    order: Sequence[Member | None],
    *,
    owners: int | None = None,
    budget_sec: float = BUDGET,
    only: SpanId | None = None,
) -> AsyncIterator[tuple[PeerSource, FakeView, PeerFetchStatistics, SpanId]]:
    """A PeerSource over `order`'s members, and a span (`only`, when given) whose chunk's
    owners are exactly `order` (None: this node), best first."""
    count = owners if owners is not None else len(order)
    ids = [m.id if m else None for m in order]
    span, self_id = arrange(layer.digest, spans, CHUNK, ids, count, only)
    view = FakeView([m for m in order if m is not None])
    stats = PeerFetchStatistics()
    client = PeerClient(connect_timeout_sec=1.0)
    settings = PeerSettings(
        view=view,
        client=client,
        self_id=self_id,
        owners=count,
        chunk_bytes=CHUNK,
        budget_sec=budget_sec,
        stats=stats,
    )
    source = PeerSource(settings, REF, layer.digest, ZTOC_DIGEST)
    assert source.owners_of(spans.compressed_range(span)[0]) == list(order)
    try:
        yield source, view, stats, span
    finally:
        await client.aclose()


async def fetch_span(
    source: PeerSource | ChainSource, layer: Layer, spans: SpanMap, span: SpanId
) -> bytes:
    start, end = span_range(spans, span)
    return await source.fetch(
        layer.digest,
        CompressedOffset(start),
        CompressedOffset(end),
        check=span_check(spans, start, end),
    )


def want(layer: Layer, spans: SpanMap, span: SpanId) -> bytes:
    start, end = span_range(spans, span)
    return layer.blob[start:end]


# -- owners that serve -----------------------------------------------------------------------


async def test_a_good_owner_serves_verified_bytes_and_is_marked_up(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    async with (
        open_listener(layer, tmp_path) as good,
        peer_source(layer, spans, [good.member, None]) as (source, view, stats, span),
    ):
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        assert view.up == [good.member] and view.down == []
        assert good.upstream.calls == [span_range(spans, span)]
        assert stats.requests == 1
        assert stats.bytes_fetched == len(want(layer, spans, span))
        assert stats.failures == stats.declined == stats.owned_here == 0


async def test_a_multi_span_range_from_an_owner(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """Coalesced runs are several spans (neighbouring gzip spans share a byte)."""
    start, end = span_range(spans, 2, 6)
    async with open_listener(layer, tmp_path) as good:
        view = FakeView([good.member])
        client = PeerClient(connect_timeout_sec=1.0)
        try:
            # a chunk size holding the whole run; the peer must be its first owner
            for n in range(2000):
                settings = PeerSettings(
                    view=view,
                    client=client,
                    self_id=f"10.253.{n // 250}.{n % 250 + 1}:8472",
                    owners=1,
                    chunk_bytes=1 << 30,
                    budget_sec=BUDGET,
                    stats=PeerFetchStatistics(),
                )
                source = PeerSource(settings, REF, layer.digest, ZTOC_DIGEST)
                if source.owners_of(start) == [good.member]:
                    break
            got = await source.fetch(
                layer.digest,
                CompressedOffset(start),
                CompressedOffset(end),
                check=span_check(spans, start, end),
            )
        finally:
            await client.aclose()
        assert got == layer.blob[start:end]
        assert view.up == [good.member] and view.down == []


# -- owners that fail ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [
        ("corrupt", 0, "span"),
        ("status", 404, "HTTP 404"),
        ("status", 500, "HTTP 500"),
        ("short", 0, "bytes"),
    ],
)
async def test_a_failing_owner_is_marked_down_and_the_next_owner_serves(
    layer: Layer,
    spans: SpanMap,
    tmp_path: Path,
    behaviour: Behaviour,
    status: int,
    reason: str,
) -> None:
    async with (
        open_fake_peer(layer.blob, behaviour, status=status) as bad,
        open_listener(layer, tmp_path) as good,
        peer_source(layer, spans, [bad.member, good.member]) as (source, view, stats, span),
    ):
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        assert bad.requests == 1
        assert view.downed() == [bad.member]
        assert reason in view.down[0][1], view.down
        assert view.up == [good.member]
        assert stats.failures == 1 and stats.requests == 2


async def test_an_owner_that_never_answers_costs_one_budget(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    async with (
        open_fake_peer(layer.blob, "silent") as silent,
        open_listener(layer, tmp_path) as good,
        peer_source(layer, spans, [silent.member, good.member]) as (source, view, _stats, span),
    ):
        started = time.monotonic()
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        elapsed = time.monotonic() - started
        assert BUDGET * 0.9 <= elapsed < 2 * BUDGET, elapsed
        assert silent.requests == 1
        assert view.downed() == [silent.member]
        assert "within" in view.down[0][1]
        assert view.up == [good.member]


async def test_an_owner_that_went_down_meanwhile_is_not_asked(layer: Layer, spans: SpanMap) -> None:
    async with (
        open_fake_peer(layer.blob, "silent") as silent,
        open_fake_peer(layer.blob, "silent") as gone,
        peer_source(layer, spans, [silent.member, gone.member]) as (source, view, stats, span),
    ):

        async def goes_down() -> None:  # found down by another fetch while the first
            await trio.sleep(BUDGET / 2)  # owner's budget runs
            view.members.remove(gone.member)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(goes_down)
            with pytest.raises(SourceUnavailable, match=f"{gone.member.id}: down"):
                await fetch_span(source, layer, spans, span)
        assert silent.requests == 1 and gone.requests == 0 and stats.requests == 1


async def test_a_refused_owner_is_skipped_at_once(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    gone = closed_port()
    async with (
        open_listener(layer, tmp_path) as good,
        peer_source(layer, spans, [gone, good.member], budget_sec=5.0) as (
            source,
            view,
            _stats,
            span,
        ),
    ):
        started = time.monotonic()
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        assert time.monotonic() - started < 0.5
        assert view.downed() == [gone]
        assert view.up == [good.member]


async def test_an_owner_that_cannot_fetch_is_not_marked_down(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """503: the owner is alive and honest (its registry failed): the next owner is asked."""
    failing = MemorySource(layer.blob, name="upstream")
    failing.raise_next = [SourceUnavailable("registry down")]
    async with (
        open_listener(layer, tmp_path / "a", upstream=failing) as declining,
        open_listener(layer, tmp_path / "b") as good,
        peer_source(layer, spans, [declining.member, good.member]) as (
            source,
            view,
            stats,
            span,
        ),
    ):
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        assert view.down == []
        assert view.up == [good.member]
        assert stats.declined == 1 and stats.failures == 0
        assert declining.server.stats.unavailable == 1


async def test_an_owner_out_of_time_is_not_marked_down(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """The owner's registry is slower than the budget: it answers 503 before the requester
    gives up, so a healthy owner is not marked down; one budget is spent. (The owner answers
    a tenth of the budget early: a budget of 2 s leaves 0.2 s for the answer to arrive, where
    the 50 ms of the usual test budget was missed on a busy machine.)"""
    slow = MemorySource(layer.blob, name="upstream")
    slow.gate = trio.Event()
    budget = 2.0
    async with (
        open_listener(layer, tmp_path / "a", upstream=slow) as stuck,
        open_listener(layer, tmp_path / "b") as good,
        peer_source(layer, spans, [stuck.member, good.member], budget_sec=budget) as (
            source,
            view,
            stats,
            span,
        ),
    ):
        started = time.monotonic()
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        assert time.monotonic() - started < 2 * budget
        assert view.down == [] and stats.declined == 1
        slow.gate.set()


async def test_every_owner_failing_is_source_unavailable_naming_each(
    layer: Layer, spans: SpanMap
) -> None:
    gone = closed_port()
    async with (
        open_fake_peer(layer.blob, "corrupt") as bad,
        peer_source(layer, spans, [bad.member, gone]) as (source, view, _stats, span),
    ):
        with pytest.raises(SourceUnavailable) as err:
            await fetch_span(source, layer, spans, span)
        assert "mismatch" in str(err.value) and gone.id in str(err.value)
        assert view.downed() == [bad.member, gone]
        assert view.up == []


# -- no request to peers -------------------------------------------------------------------------


async def test_this_node_first_owner_only_asks_the_next_owner_whether_it_holds_it(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    async with (
        open_fake_peer(layer.blob, "status", status=404) as peer,
        peer_source(layer, spans, [None, peer.member]) as (source, view, stats, span),
    ):
        with pytest.raises(BlobNotFound) as err:
            await fetch_span(source, layer, spans, span)
        assert "not held" in str(err.value)
        assert peer.fetches == [False]  # asked, not asked to fetch
        assert stats.owned_here == 1 and stats.requests == 1
        assert view.down == [] and view.up == []  # a 404 to "do you hold it?" is no failure
    # an owner after this node that holds the range serves it (a member joined, and the
    # chunk's previous first owner still has it), without fetching anything again
    upstream = MemorySource(layer.blob, name="upstream")
    async with open_listener(layer, tmp_path, upstream=upstream) as holder:
        async with peer_source(layer, spans, [holder.member, None]) as (before, _v, _s, span):
            assert await fetch_span(before, layer, spans, span) == want(layer, spans, span)
        assert len(upstream.calls) == 1
        async with peer_source(layer, spans, [None, holder.member], only=span) as (
            after,
            view,
            _s,
            _span,
        ):
            assert await fetch_span(after, layer, spans, span) == want(layer, spans, span)
            assert view.up == [holder.member]
        assert len(upstream.calls) == 1


async def test_no_live_member_means_this_node_owns_everything(layer: Layer, spans: SpanMap) -> None:
    async with peer_source(layer, spans, [None]) as (source, _view, stats, span):
        with pytest.raises(BlobNotFound):
            await fetch_span(source, layer, spans, span)
        assert stats.owned_here == 1


async def test_serving_a_peer_only_asks_whether_other_owners_hold_it(
    layer: Layer, spans: SpanMap
) -> None:
    async with (
        open_fake_peer(layer.blob, "status", status=404) as peer,
        peer_source(layer, spans, [peer.member, None]) as (source, view, _stats, span),
    ):
        token = SERVING_PEER.set(True)
        try:
            with pytest.raises(BlobNotFound) as err:
                await fetch_span(source, layer, spans, span)
        finally:
            SERVING_PEER.reset(token)
        assert "not held" in str(err.value)
        assert peer.fetches == [False] and view.down == []
        # the same fetch outside a peer request asks the first owner to fetch it; its 404 is
        # then a failure (it would have fetched), and this node, the second owner, fetches
        with pytest.raises(BlobNotFound):
            await fetch_span(source, layer, spans, span)
        assert peer.fetches == [False, True] and view.downed() == [peer.member]


async def test_an_owner_that_does_not_know_this_node_yet_is_not_marked_down(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    """403: its member list does not have this node yet (it just joined)."""
    async with (
        open_fake_peer(layer.blob, "status", status=403) as stranger,
        open_listener(layer, tmp_path) as good,
        peer_source(layer, spans, [stranger.member, good.member]) as (source, view, stats, span),
    ):
        assert await fetch_span(source, layer, spans, span) == want(layer, spans, span)
        assert view.down == [] and view.up == [good.member]
        assert stats.declined == 1


# -- the chain: peers, then the registry -------------------------------------------------------


FAULTS = ["corrupt", "404", "503", "silent", "short", "refused", "owned here", "serving a peer"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_the_chain_falls_back_to_the_registry_with_right_bytes(
    layer: Layer, spans: SpanMap, fault: str
) -> None:
    registry = MemorySource(layer.blob, name="registry")
    async with contextlib.AsyncExitStack() as stack:
        if fault == "refused":
            peer: Member | None = closed_port()
        elif fault in ("owned here", "serving a peer"):
            peer = None
        else:
            behaviour: Behaviour = {"corrupt": "corrupt", "silent": "silent", "short": "short"}.get(
                fault, "status"
            )  # type: ignore[assignment]
            fake = await stack.enter_async_context(
                open_fake_peer(layer.blob, behaviour, status=int(fault) if fault.isdigit() else 0)
            )
            peer = fake.member
        order = [peer] if fault != "serving a peer" else [closed_port()]
        source, view, _stats, span = await stack.enter_async_context(
            peer_source(layer, spans, order, owners=1)
        )
        chain = ChainSource([source, registry], budgets=[BUDGET * 1 + 1.0, 10.0])
        if fault == "serving a peer":
            token = SERVING_PEER.set(True)
            stack.callback(SERVING_PEER.reset, token)
        started = time.monotonic()
        assert await fetch_span(chain, layer, spans, span) == want(layer, spans, span)
        assert time.monotonic() - started < 2 * BUDGET
        assert registry.calls == [span_range(spans, span)]
        assert chain.served() == {"registry": len(want(layer, spans, span))}
        if fault in ("owned here", "503"):
            assert view.down == []
        else:
            assert view.downed() == order


async def test_the_chain_takes_a_good_owners_bytes_without_the_registry(
    layer: Layer, spans: SpanMap, tmp_path: Path
) -> None:
    registry = MemorySource(layer.blob, name="registry")
    async with (
        open_listener(layer, tmp_path) as good,
        peer_source(layer, spans, [good.member], owners=1) as (source, _view, _stats, span),
    ):
        chain = ChainSource([source, registry], budgets=[BUDGET + 1.0, 10.0])
        assert await fetch_span(chain, layer, spans, span) == want(layer, spans, span)
        assert registry.calls == []
        assert chain.served() == {"peers": len(want(layer, spans, span))}


async def test_a_peer_error_is_a_fetch_error(layer: Layer, spans: SpanMap) -> None:
    """What escapes a PeerSource is a FetchError (the chain's contract), never an httpx or
    OS error."""
    async with peer_source(layer, spans, [closed_port()]) as (source, _view, _stats, span):
        with pytest.raises(FetchError):
            await fetch_span(source, layer, spans, span)
