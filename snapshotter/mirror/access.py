"""`PublicRepositories`: may anyone read this repository at its registry?

The registry mirror serves manifests, image configs (anything that is not a layer) only for
repositories an anonymous client may read at the registry, so a node without pull secrets
fails exactly as it would without the mirror. The question is asked with one anonymous
`HEAD` of the blob or manifest being requested (through the registry's own endpoints,
never this node's mirror): the blobs endpoint, then the manifests endpoint when the blobs
endpoint does not know the digest (registries such as distribution keep manifests apart
from layers and configs). The answer is kept per (registry, repository): a yes for
`public_ttl_sec`, a no for `private_ttl_sec`. A registry that cannot be reached counts as
no and is not remembered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.errors import NotFoundError, OciError, UnauthorizedError
from index.oci.lru import TtlLru
from index.oci.reference import Reference

log = logging.getLogger(__name__)

MAX_REPOSITORIES = 1024


class PublicRepositories:
    """See the module doc. `client` must carry no credentials. Use from one event loop."""

    def __init__(
        self,
        client: AsyncRegistryClient,
        *,
        public_ttl_sec: float = 300.0,
        private_ttl_sec: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._public = TtlLru[tuple[str, str], bool](MAX_REPOSITORIES, public_ttl_sec, clock=clock)
        self._private = TtlLru[tuple[str, str], bool](
            MAX_REPOSITORIES, private_ttl_sec, clock=clock
        )

    def __repr__(self) -> str:
        return f"<PublicRepositories public={len(self._public)} private={len(self._private)}>"

    async def is_public(self, ref: Reference, digest: Digest) -> bool:
        """Whether an anonymous client may read `digest` in `ref`'s repository."""
        key = (ref.registry, ref.repository)
        if self._public.get(key):
            return True
        if self._private.get(key):
            return False
        try:
            await self._anonymous_head(ref, digest)
        except (UnauthorizedError, NotFoundError):
            self._private.put(key, True)
            return False
        except OciError as e:
            log.debug("anonymous check failed", extra={"repository": str(key), "error": str(e)})
            return False
        self._public.put(key, True)
        return True

    async def _anonymous_head(self, ref: Reference, digest: Digest) -> None:
        """Raises NotFoundError, UnauthorizedError (not readable anonymously), OciError."""
        try:
            await self._client.head_blob(ref, digest)
        except NotFoundError:
            await self._client.resolve(Reference(ref.registry, ref.repository, digest=digest))
