"""Referrers of a manifest: the referrers API, and the `sha256-<hex>` tag schema fallback
(read when the API answers 404, updated when a registry does not index subjects itself)."""

from __future__ import annotations

import httpx

from index import gojson
from index.digest import Digest
from index.oci import mediatypes
from index.oci.descriptor import Descriptor
from index.oci.errors import NotFoundError
from index.oci.hosts import CAP_REFERRERS, RegistryHost
from index.oci.manifests import MAX_MANIFEST_BYTES, Manifests
from index.oci.reference import Reference
from index.oci.responses import index_entries, next_link, read_capped, referrers_tag, status_error
from index.oci.session import PUSH, RegistrySession

MAX_PAGES = 100


class Referrers:
    """Referrers reads and tag-schema updates over a session and its manifest reads."""

    def __init__(self, session: RegistrySession, manifests: Manifests) -> None:
        self._s = session
        self._manifests = manifests

    async def list_for(
        self, ref: Reference, subject: Digest, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of manifests whose `subject` is `subject`, optionally of one artifact type.

        Uses the referrers API; on 404 falls back to the `sha256-<hex>` tag schema (absent tag:
        no referrers). Filters on the client when the registry did not. Raises
        UnauthorizedError, TransportError, UnexpectedResponseError.
        """
        s = self._s
        what = f"referrers of {ref.name}@{subject}"

        async def op(ep: RegistryHost) -> list[Descriptor]:
            params = s.pull_params(ep, ref)
            if artifact_type:
                params["artifactType"] = artifact_type
            url: httpx.URL | None = s.url(ep, f"/{ref.repository}/referrers/{subject}", params)
            out: list[Descriptor] = []
            pages = 0
            while url is not None and pages < MAX_PAGES:
                pages += 1
                response = await s.request(
                    ep,
                    ref.repository,
                    "GET",
                    url,
                    headers={"Accept": mediatypes.OCI_INDEX},
                    stream=True,
                )
                if response.status_code == 404 and pages == 1:
                    await response.aclose()
                    return await self._from_tag(ep, ref, subject, artifact_type)
                if not response.is_success:
                    raise await status_error(response, what)
                data = await read_capped(response, MAX_MANIFEST_BYTES, what)
                filtered = "artifacttype" in response.headers.get("oci-filters-applied", "").lower()
                out += index_entries(data, str(url), None if filtered else artifact_type)
                url = next_link(response)
            return out

        return await s.each_endpoint(ref, CAP_REFERRERS, what, op)

    async def _from_tag(
        self, ep: RegistryHost, ref: Reference, subject: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        tag = referrers_tag(subject)
        try:
            _, data = await self._manifests.get_from(
                ep, ref, None, (mediatypes.OCI_INDEX,), obj=tag
            )
        except NotFoundError:
            return []
        return index_entries(data, f"{ep.base_url}/{ref.repository}/manifests/{tag}", artifact_type)

    async def add_to_tag(
        self, ep: RegistryHost, ref: Reference, subject: Digest, entry: Descriptor
    ) -> bool:
        """Add `entry` to the tag-schema index of `subject`; False if it was already there.

        Not atomic: two clients adding referrers to one subject at once can lose one.
        """
        tag = referrers_tag(subject)
        try:
            _, data = await self._manifests.get_from(
                ep, ref, None, (mediatypes.OCI_INDEX,), obj=tag
            )
            entries = index_entries(data, tag, None)
        except NotFoundError:
            entries = []
        if any(d.digest == entry.digest for d in entries):
            return False
        index = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [d.to_json() for d in [*entries, entry]],
        }
        url = self._s.url(ep, f"/{ref.repository}/manifests/{tag}")
        response = await self._s.request(
            ep,
            ref.repository,
            "PUT",
            url,
            actions=PUSH,
            headers={"Content-Type": mediatypes.OCI_INDEX},
            content=gojson.marshal(index),
        )
        if not response.is_success:
            raise await status_error(response, f"update referrers tag {ref.name}:{tag}")
        await response.aclose()
        return True
