"""`MirrorService`: the registry mirror's answers (what the peer listener serves containerd).

containerd's `hosts.toml` names this node's listener as the first mirror of a registry; it
asks for manifests and blobs by digest with `?ns=<registry>`. A blob is served from:

1. containerd's content store on this node (images pulled the ordinary way; containerd
   must keep them: `discard_unpacked_layers = false`), through its Content API;
2. this node's span cache: a lazily pulled layer whose every span is cached, checked once
   against its digest as a whole blob (`spans.SpanBlobs`);
3. another member's content store or span cache: every live member is asked at once whether
   it holds the blob (`HEAD`, only its own stores, never further), the first that does
   streams it through this node.

Anything else is a 404 at once, so containerd moves on to the next host and the registry:
the mirror never makes a pull fail or wait longer than one quick miss. Every wait is
bounded: finding a blob by `lookup_timeout_sec`, and a body that stops coming for
`stall_timeout_sec` is cut (containerd then fails that fetch and retries the pull).

Private images stay private: the listener serves only members and this node, and what is not
a layer (a manifest, an image config: JSON) is served only when an anonymous client may read
that repository at its registry (`access.PublicRepositories`), because containerd also
fetches manifests by digest through the blobs endpoint. A manifest by tag is resolved from
this node's containerd image store only (`resolve_tags`; `latest` only with `resolve_latest`,
since it moves most), then served as the digest it points at, under the same rule.
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
from index.oci.reference import DEFAULT_TAG, Reference
from snapshotter.peers.content import ContentStore, ContentStoreError
from snapshotter.peers.images import ImageStoreError, image_name

from .access import PublicRepositories
from .spans import SpanBlobs

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


class ImageTargets(Protocol):
    """containerd's image store on this node (`snapshotter.peers.images.ImageStore`)."""

    async def target(self, name: str) -> tuple[Digest, str, int] | None:
        """(digest, media type, size) of what image `name` points at, None when there is no
        such image. Raises ImageStoreError."""
        ...


@dataclass(frozen=True, slots=True)
class Located:
    """Where a blob is: `peer` "" for this node's own stores (`spans`: its span cache)."""

    size: int
    peer: str = ""
    spans: bool = False

    @property
    def source(self) -> str:
        return "peer" if self.peer else "spans" if self.spans else "content"


@dataclass(slots=True)
class MirrorStatistics:
    blobs: int = 0
    manifests: int = 0
    bytes_served: int = 0
    from_content: int = 0
    from_peers: int = 0
    from_spans: int = 0
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
        images: ImageTargets | None = None,
        resolve_tags: bool = True,
        resolve_latest: bool = False,
        spans: SpanBlobs | None = None,
    ) -> None:
        self._content = content
        self._spans = spans
        self._peers = peers
        self._public = public
        self.lookup_timeout_sec = lookup_timeout_sec
        self.stall_timeout_sec = stall_timeout_sec
        self._images = images
        self.resolve_tags = resolve_tags
        self.resolve_latest = resolve_latest
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
        if self._spans is not None:
            size = await self._spans.size(ref, digest)
            if size is not None:
                return Located(size, spans=True)
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
        if where.spans:
            assert self._spans is not None
            return self._spans.stream(digest, start, end)
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
        elif where.spans:
            self.stats.from_spans += sent
        else:
            self.stats.from_content += sent
        if sent != end - start:
            raise MirrorError(503, f"{digest}: {sent} bytes of {end - start}")

    async def manifest(self, ref: Reference, reference: str) -> tuple[bytes, str, Digest]:
        """The manifest `reference` of `ref`'s repository: (its bytes, its media type, its
        digest), for public repositories only. `reference` is a digest (from this node's
        content store, else a member's, whose answer is checked against the digest), or a tag
        resolved in this node's image store (`resolve_tags`; `latest` only with
        `resolve_latest`) and then read here. Raises MirrorError 404."""
        tagged = False
        try:
            digest = Digest(reference)
        except ValueError:
            digest = await self._resolve(ref, reference)
            tagged = True
        where = await self.locate(ref, digest, local_only=tagged)
        if where.size > MAX_MANIFEST_BYTES:
            raise MirrorError(404, f"{digest}: too large for a manifest")
        data = b"".join([c async for c in self.body(ref, digest, where, 0, where.size)])
        if Digest.of(data) != digest:
            raise MirrorError(404, f"{digest}: content does not match its digest")
        media_type = _media_type(data)
        if not media_type:
            raise MirrorError(404, f"{digest}: not a manifest")
        self.stats.manifests += 1
        return data, media_type, digest

    async def _resolve(self, ref: Reference, tag: str) -> Digest:
        """The digest tag `tag` of `ref`'s repository points at in this node's image store,
        within `lookup_timeout_sec`. Raises MirrorError 404 (tags not resolved here, `latest`
        not allowed, not a tag, no such image, the store failed or was too slow)."""
        where = f"{ref.name}:{tag}"
        if self._images is None or not self.resolve_tags:
            raise MirrorError(404, f"{where}: tags are resolved at the registry")
        if tag == DEFAULT_TAG and not self.resolve_latest:
            raise MirrorError(404, f"{where}: latest is resolved at the registry")
        try:
            name = image_name(ref.registry, ref.repository, tag)
        except ValueError:
            raise MirrorError(404, f"{where}: not a tag or a digest") from None
        target = None
        with trio.move_on_after(self.lookup_timeout_sec):
            try:
                target = await self._images.target(name)
            except ImageStoreError as e:
                log.debug("image store lookup failed", extra={"image": name, "error": str(e)})
        if target is None:
            self.stats.not_found += 1
            raise MirrorError(404, f"{where}: no such image on this node")
        return target[0]


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
