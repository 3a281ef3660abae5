"""`PeerSource`: the `BlobSource` that asks a chunk's owners before the registry.

For a range of one layer (the span fetcher never lets a request cross a chunk boundary when
peers are on), the chunk's owners are the `owners` highest rendezvous scores among the live
members and this node (`ownership.owners`). They are asked in that order, each within
`budget_sec`:

- owners ranked before this node are asked to serve the range, fetching it from their own
  registry if they must (the owner protocol's `fetch`);
- this node's own place in the list, and every owner after it, only asks whether they hold
  the range already (no `fetch`: a quick 404 when they do not): after a member joins or
  leaves, the chunks it now owns are often still held by the owners before the change;
- no owner served it: when this node is among the owners, the fetch leaves the peers
  (`BlobNotFound`) and the chain's next source (hosts.toml mirrors, then the registry)
  fetches it here: this node is the one that fetches the chunk for the cluster;
- a peer answers: its bytes are checked against the zTOC span digests (the caller's `check`,
  in a worker thread) before anything else sees them; on success the peer is marked up;
- a peer fails (wrong bytes, refused, reset, timeout, a short body, a 404 where it should
  have fetched): it is marked down (skipped for a back-off) and the next owner is tried; a
  503 (it could not fetch the range, e.g. no credentials for the repository) or a 403 (its
  member list does not have this node yet) moves on without marking it down.

A request made while serving a peer (`SERVING_PEER` set by the listener) only asks the other
owners whether they hold the range, and those requests never lead to further ones, so
requests cannot loop between nodes whose member lists differ for a moment.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from index.digest import Digest
from index.model import CompressedOffset
from index.oci.reference import Reference
from index.oci.responses import BodySink
from snapshotter.lazy.sources import (
    PEER_SOURCE_NAME,
    VERIFY_THREADS,
    AccessDenied,
    BlobNotFound,
    Check,
    FetchError,
    SourceUnavailable,
)

from .client import PeerClient, PeerDeclined
from .members import Member
from .ownership import chunk_of, owners

log = logging.getLogger(__name__)

SERVING_PEER: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "sociable_serving_peer", default=False
)
"""True in the tasks of a peer request the listener serves: their fetches skip peers."""


class PeerView(Protocol):
    """What a `PeerSource` needs of the membership."""

    def live(self) -> Sequence[Member]: ...

    def is_live(self, member: Member) -> bool: ...

    def mark_down(self, member: Member, reason: str) -> None: ...

    def mark_up(self, member: Member) -> None: ...


@dataclass(slots=True)
class PeerFetchStatistics:
    """Counters of the peer client side, all layers together."""

    requests: int = 0
    bytes_fetched: int = 0
    failures: int = 0
    declined: int = 0
    owned_here: int = 0


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """What every `PeerSource` of the node shares."""

    view: PeerView
    client: PeerClient
    self_id: str
    owners: int
    chunk_bytes: int
    budget_sec: float
    stats: PeerFetchStatistics


class PeerSource:
    """Range reads of one layer from its chunks' owners (see the module doc)."""

    def __init__(self, settings: PeerSettings, ref: Reference, layer: Digest, ztoc: Digest) -> None:
        self._s = settings
        self._ref = ref
        self._layer = layer
        self._ztoc = ztoc

    @property
    def name(self) -> str:
        return PEER_SOURCE_NAME

    def __repr__(self) -> str:
        return f"<PeerSource {self._layer} owners={self._s.owners}>"

    def owners_of(self, start: int) -> list[Member | None]:
        """The owners of the chunk holding compressed offset `start`, best first; None is
        this node."""
        s = self._s
        candidates: list[tuple[str, Member | None]] = [(m.id, m) for m in s.view.live()]
        candidates.append((s.self_id, None))
        return owners(candidates, str(self._layer), chunk_of(start, s.chunk_bytes), s.owners)

    async def fetch(
        self,
        digest: Digest,
        start: CompressedOffset,
        end: CompressedOffset,
        *,
        check: Check | None = None,
        sink: BodySink | None = None,
    ) -> bytes:
        """The verified bytes `[start, end)` from an owner (see the module doc); `sink` sees
        each owner's answer as it arrives (it begins again for the next owner). Raises
        `BlobNotFound` when the fetch should go upstream from here (this node ranks before
        every owner holding the range, or serves a peer and no other owner holds it), else
        `SourceUnavailable` naming every owner's failure."""
        s = self._s
        what = f"bytes {start}-{end} of {digest}"
        # Owners ranked before this node may fetch for it; after it (or while this node
        # serves a peer) they are only asked whether they hold the range already.
        may_fetch = not SERVING_PEER.get()
        failures: list[str] = []
        for owner in self.owners_of(start):
            if owner is None:
                may_fetch = False
                s.stats.owned_here += 1
                continue
            if not s.view.is_live(owner):  # went down while an owner before it was asked
                failures.append(f"{owner.id}: down")
                continue
            s.stats.requests += 1
            try:
                data = await s.client.fetch_range(
                    owner.id,
                    registry=self._ref.registry,
                    repository=self._ref.repository,
                    layer=digest,
                    ztoc=self._ztoc,
                    start=start,
                    end=end,
                    budget_sec=s.budget_sec,
                    fetch=may_fetch,
                    sink=sink,
                )
                if check is not None:
                    await trio.to_thread.run_sync(check, data, limiter=VERIFY_THREADS)
            except BlobNotFound as e:
                if may_fetch:  # it would have fetched it: something is wrong with it
                    self._failed(owner, e, failures)
                else:
                    failures.append(f"{owner.id}: not held")
                continue
            except (PeerDeclined, AccessDenied) as e:
                # could not fetch it now, or does not know this node yet (its member list
                # is behind ours): alive and honest, not marked down
                s.stats.declined += 1
                failures.append(f"{owner.id}: {e}")
                continue
            except FetchError as e:
                self._failed(owner, e, failures)
                continue
            s.stats.bytes_fetched += len(data)
            s.view.mark_up(owner)
            return data
        message = f"{what}: no owner served it ({'; '.join(failures) or 'no live owner'})"
        if not may_fetch:  # this node fetches it upstream, for the owners after it too
            raise BlobNotFound(message, source=self.name)
        raise SourceUnavailable(message, source=self.name)

    def _failed(self, owner: Member, e: FetchError, failures: list[str]) -> None:
        self._s.stats.failures += 1
        failures.append(f"{owner.id}: {e}")
        self._s.view.mark_down(owner, str(e))
