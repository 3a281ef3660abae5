"""Manifest reads: resolving a reference and fetching a manifest or index by tag or digest.

Every method takes the endpoint loop from the session (`each_endpoint`); `get_from` is the
one-endpoint read the referrers tag schema also uses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence

from index.digest import Digest, DigestError
from index.oci import mediatypes
from index.oci.descriptor import Descriptor
from index.oci.errors import DigestMismatchError, UnexpectedResponseError
from index.oci.hosts import CAP_PULL, CAP_RESOLVE, RegistryHost
from index.oci.reference import Reference
from index.oci.responses import media_type_of, read_capped, status_error
from index.oci.session import RegistrySession

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Manifests larger than this are refused (distribution's own limit)."""
_GENERIC_TYPES = frozenset({"application/json", "application/octet-stream", "text/plain"})


def _check_digest(raw: str, ref: Reference, url: str) -> Digest:
    try:
        digest = Digest(raw)
    except DigestError as e:
        raise UnexpectedResponseError(f"{url}: bad Docker-Content-Digest {raw!r}", url=url) from e
    if ref.digest and digest != ref.digest:
        raise DigestMismatchError(
            f"{url}: registry says {digest}, reference wants {ref.digest}", url=url
        )
    return digest


class Manifests:
    """Manifest reads over a `RegistrySession` (which it does not own)."""

    def __init__(self, session: RegistrySession) -> None:
        self._s = session

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor a reference points at (tag defaults to `latest`).

        HEAD first; GET and hash when HEAD does not give digest, type and size. Raises
        NotFoundError, UnauthorizedError, DigestMismatchError, TransportError.
        """
        ref = ref.with_default_tag()
        capability = CAP_PULL if ref.digest else CAP_RESOLVE
        s = self._s

        async def op(ep: RegistryHost) -> Descriptor:
            url = s.url(ep, f"/{ref.repository}/manifests/{ref.object}", s.pull_params(ep, ref))
            accept = {"Accept": ", ".join(mediatypes.MANIFEST_ACCEPT)}
            response = await s.request(ep, ref.repository, "HEAD", url, headers=accept)
            await response.aclose()
            if response.status_code == 404 and ref.digest:
                blob = s.url(ep, f"/{ref.repository}/blobs/{ref.digest}", s.pull_params(ep, ref))
                response = await s.request(ep, ref.repository, "HEAD", blob, headers=accept)
                await response.aclose()
            if response.is_success:
                raw = response.headers.get("docker-content-digest") or (
                    str(ref.digest) if ref.digest else ""
                )
                length = response.headers.get("content-length")
                media_type = media_type_of(response)
                if raw and length and media_type:
                    return Descriptor(media_type, _check_digest(raw, ref, str(url)), int(length))
            elif response.status_code not in (405, 400):
                raise await status_error(response, f"resolve {ref}")
            desc, _ = await self.get_from(ep, ref, ref.digest)
            return desc

        return await s.each_endpoint(ref, capability, f"resolve {ref}", op)

    async def get(
        self,
        ref: Reference,
        digest: Digest | None = None,
        *,
        accept: Sequence[str] = mediatypes.MANIFEST_ACCEPT,
    ) -> tuple[Descriptor, bytes]:
        """Fetch a manifest or index by `digest`, else by the reference's digest or tag.

        Returns its descriptor (media type from Content-Type or the document) and exact bytes.
        Content fetched by digest is verified. Raises NotFoundError, DigestMismatchError,
        UnauthorizedError, TransportError, UnexpectedResponseError (too large, bad answer).
        """
        ref = ref.with_default_tag()
        capability = CAP_PULL if (digest or ref.digest) else CAP_RESOLVE

        async def op(ep: RegistryHost) -> tuple[Descriptor, bytes]:
            return await self.get_from(ep, ref, digest, accept)

        return await self._s.each_endpoint(ref, capability, f"get manifest {ref}", op)

    async def get_from(
        self,
        ep: RegistryHost,
        ref: Reference,
        digest: Digest | None,
        accept: Sequence[str] = mediatypes.MANIFEST_ACCEPT,
        *,
        obj: str | None = None,
    ) -> tuple[Descriptor, bytes]:
        """`get` on one endpoint; `obj` names a tag to read instead (referrers tag schema)."""
        s = self._s
        want = digest if obj else (digest or ref.digest)
        target = obj or (str(want) if want else ref.object)
        url = s.url(ep, f"/{ref.repository}/manifests/{target}", s.pull_params(ep, ref))
        response = await s.request(
            ep, ref.repository, "GET", url, headers={"Accept": ", ".join(accept)}, stream=True
        )
        if not response.is_success:
            raise await status_error(response, f"get manifest {ref.name}@{target}")
        data = await read_capped(response, MAX_MANIFEST_BYTES, f"manifest {ref.name}@{target}")
        got = Digest.of(data)
        header = response.headers.get("docker-content-digest")
        expected = want or (Digest(header) if header and header.startswith("sha256:") else None)
        if expected and got != expected:
            raise DigestMismatchError(
                f"manifest {ref.name}@{target} from {url}: content hashes to {got}, "
                f"expected {expected}",
                url=str(url),
            )
        media_type = media_type_of(response)
        if not media_type or media_type in _GENERIC_TYPES:
            with contextlib.suppress(ValueError, AttributeError):
                media_type = str(json.loads(data).get("mediaType", "")) or media_type
        return Descriptor(media_type, got, len(data)), data
