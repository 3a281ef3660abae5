"""`MirrorService`: the registry mirror's answers (what the peer listener serves containerd).

containerd's `hosts.toml` names this node's listener as the first mirror of a registry; it
asks for manifests and blobs by digest with `?ns=<registry>`. A blob is served from:

1. containerd's content store on this node (images pulled the ordinary way; containerd
   must keep them: `discard_unpacked_layers = false`), through its Content API;
2. another member's content store: every live member is asked at once whether it holds the
   blob (`HEAD`, only its own content store, never further), the first that does streams it
   through this node.

Anything else is a 404 at once, so containerd moves on to the next host and the registry:
the mirror never makes a pull fail or wait longer than one quick miss. Every wait is
bounded: finding a blob by `lookup_timeout_sec`, and a body that stops coming for
`stall_timeout_sec` is cut (containerd then fails that fetch and retries the pull).

Private images stay private: the listener serves only members and this node, and what is not
a layer (a manifest, an image config: JSON) is served only when an anonymous client may read
that repository at its registry (`access.PublicRepositories`), because containerd also
fetches manifests by digest through the blobs endpoint. Manifests by tag are not resolved
(answer 404: containerd resolves tags at the registry with the pod's credentials).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from index.digest import Digest
from index.oci.reference import Reference
from snapshotter.peers.content import ContentStore, ContentStoreError

from .access import PublicRepositories

log = logging.getLogger(__name__)

SNIFF_BYTES: Final = 64
"""Bytes read to tell a JSON document (manifest, index, config) from a layer."""

MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024


class MirrorError(Exception):
    """A mirror request answered without bytes; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PeerBlobs(Protocol):
    """Other members' content stores (the peer client side of the mirror)."""

    async def find(
        self, ref: Reference, digest: Digest, timeout_sec: float
    ) -> tuple[str, int] | None:
        """(peer, size) of a member holding `digest`, or None."""
        ...

    def stream(
        self, peer: str, ref: Reference, digest: Digest, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        """The bytes `[start, end)` from `peer`'s content store."""
        ...


@dataclass(frozen=True, slots=True)
class Located:
    """Where a blob is: `peer` "" for this node's content store."""

    size: int
    peer: str = ""

    @property
    def source(self) -> str:
        return "peer" if self.peer else "content"


@dataclass(slots=True)
class MirrorStatistics:
    blobs: int = 0
    manifests: int = 0
    bytes_served: int = 0
    from_content: int = 0
    from_peers: int = 0
    not_found: int = 0
    private: int = 0


class MirrorService:
    """See the module doc. Use from the trio thread."""

    def __init__(
        self,
        *,
        content: ContentStore | None,
        peers: PeerBlobs | None,
        public: PublicRepositories,
        lookup_timeout_sec: float = 2.0,
        stall_timeout_sec: float = 10.0,
    ) -> None:
        self._content = content
        self._peers = peers
        self._public = public
        self.lookup_timeout_sec = lookup_timeout_sec
        self.stall_timeout_sec = stall_timeout_sec
        self.stats = MirrorStatistics()

    def __repr__(self) -> str:
        return f"<MirrorService content={self._content!r} blobs={self.stats.blobs}>"

    async def locate(self, ref: Reference, digest: Digest, *, local_only: bool) -> Located:
        """Where `digest` is, checked for privacy. Raises MirrorError 404."""
        with trio.move_on_after(self.lookup_timeout_sec):
            found = await self._find(ref, digest, local_only)
            if found is not None:
                try:
                    shareable = await self._may_share(ref, digest, found)
                except Exception as e:  # the source or the check failed: a miss, not a 500
                    log.debug(
                        "mirror lookup failed",
                        extra={"source": found.source, "peer": found.peer, "error": str(e)},
                    )
                else:
                    if not shareable:
                        self.stats.private += 1
                        raise MirrorError(404, f"{digest} in {ref.name}: not public")
                    return found
        self.stats.not_found += 1
        raise MirrorError(404, f"{digest} in {ref.name}: not held by this node or its peers")

    async def _find(self, ref: Reference, digest: Digest, local_only: bool) -> Located | None:
        if self._content is not None:
            try:
                size = await self._content.size(digest)
            except ContentStoreError as e:
                log.debug("content store lookup failed", extra={"error": str(e)})
                size = None
            if size is not None:
                return Located(size)
        if local_only or self._peers is None:
            return None
        found = await self._peers.find(ref, digest, self.lookup_timeout_sec)
        return None if found is None else Located(found[1], found[0])

    async def _may_share(self, ref: Reference, digest: Digest, where: Located) -> bool:
        """Layers go to members; anything that looks like JSON only for public repositories."""
        if where.size == 0:  # nothing to tell apart (and no range to ask a member for)
            return True
        head = b""
        async with contextlib.aclosing(
            self._open(ref, digest, where, 0, min(where.size, SNIFF_BYTES))
        ) as chunks:
            async for chunk in chunks:
                head += chunk
        if head.lstrip()[:1] != b"{":
            return True
        return await self._public.is_public(ref, digest)

    def _open(
        self, ref: Reference, digest: Digest, where: Located, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        if where.peer:
            assert self._peers is not None
            return self._peers.stream(where.peer, ref, digest, start, end)
        assert self._content is not None
        return self._content.stream(digest, start, end - start)

    async def body(
        self, ref: Reference, digest: Digest, where: Located, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        """The bytes `[start, end)`, each chunk within `stall_timeout_sec` of the last.
        Raises MirrorError 503 when the source stalls or fails (the answer is then cut)."""
        if start >= end:
            return
        sent = 0
        async with contextlib.aclosing(self._open(ref, digest, where, start, end)) as chunks:
            iterator = chunks.__aiter__()
            while True:
                with trio.move_on_after(self.stall_timeout_sec) as stalled:
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as e:  # any failure of the source cuts the answer
                        raise MirrorError(503, f"{digest} from {where.source}: {e}") from e
                if stalled.cancelled_caught:
                    raise MirrorError(503, f"{digest} from {where.source}: stalled")
                sent += len(chunk)
                yield chunk
        self.stats.blobs += 1
        self.stats.bytes_served += sent
        if where.peer:
            self.stats.from_peers += sent
        else:
            self.stats.from_content += sent
        if sent != end - start:
            raise MirrorError(503, f"{digest}: {sent} bytes of {end - start}")

    async def manifest(self, ref: Reference, reference: str) -> tuple[bytes, str]:
        """The manifest `reference` (a digest) of `ref`'s repository and its media type, from
        this node's content store, for public repositories only. Raises MirrorError 404."""
        try:
            digest = Digest(reference)
        except ValueError:
            raise MirrorError(
                404, f"{ref.name}:{reference}: tags are resolved at the registry"
            ) from None
        where = await self.locate(ref, digest, local_only=True)
        if where.size > MAX_MANIFEST_BYTES:
            raise MirrorError(404, f"{digest}: too large for a manifest")
        data = b"".join([c async for c in self.body(ref, digest, where, 0, where.size)])
        if Digest.of(data) != digest:
            raise MirrorError(404, f"{digest}: content does not match its digest")
        media_type = _media_type(data)
        if not media_type:
            raise MirrorError(404, f"{digest}: not a manifest")
        self.stats.manifests += 1
        return data, media_type


def _media_type(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(value, str):
        return value
    if isinstance(doc, dict) and "manifests" in doc:
        return "application/vnd.oci.image.index.v1+json"
    if isinstance(doc, dict) and "layers" in doc:
        return "application/vnd.oci.image.manifest.v1+json"
    return ""
