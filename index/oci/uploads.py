"""Uploads: blobs (monolithic or chunked, with cross-repository mount) and manifests.

File reads and hashing run in worker threads (`anyio.to_thread`, which follows the running
event loop's library), never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import httpx

from index.digest import Digest
from index.oci.auth import repository_scope
from index.oci.descriptor import Descriptor
from index.oci.errors import DigestMismatchError
from index.oci.hosts import CAP_PUSH, RegistryHost
from index.oci.reference import Reference
from index.oci.referrers import Referrers
from index.oci.responses import referrer_descriptor, status_error, subject_of
from index.oci.session import PULL, PUSH, RegistrySession

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_MONOLITHIC_MAX_BYTES = 32 * 1024 * 1024
_IO_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PushResult:
    """What pushing a manifest did.

    `subject_indexed` is True when the registry answered `OCI-Subject` (it indexes referrers
    itself); `referrers_tag_updated` when this client updated the tag-schema index instead.
    """

    descriptor: Descriptor
    subject_indexed: bool = False
    referrers_tag_updated: bool = False


def hash_file(path: Path) -> tuple[Digest, int]:
    """sha256 digest and size of a file (blocking)."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_IO_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return Digest.from_hasher(hasher), size


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


class Uploads:
    """Pushes over a session; sizes in bytes."""

    def __init__(
        self,
        session: RegistrySession,
        referrers: Referrers,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        monolithic_max_bytes: int = DEFAULT_MONOLITHIC_MAX_BYTES,
    ) -> None:
        self._s = session
        self._referrers = referrers
        self.chunk_bytes = chunk_bytes
        self.monolithic_max_bytes = monolithic_max_bytes

    async def push_blob(
        self,
        ref: Reference,
        source: bytes | str | os.PathLike[str],
        media_type: str = "application/octet-stream",
        *,
        mount_from: str | None = None,
    ) -> Descriptor:
        """Upload a blob (bytes or a file) unless the repository already has it.

        Small blobs go in one POST+PUT; larger than `monolithic_max_bytes` in PATCH chunks of
        `chunk_bytes`. `mount_from` names a repository on the same registry to mount from.
        Raises UnauthorizedError, UnexpectedResponseError, TransportError, DigestMismatchError,
        OSError (reading the file).
        """
        s = self._s
        path = None if isinstance(source, bytes) else Path(source)
        if path is None:
            assert isinstance(source, bytes)
            digest, size = Digest.of(source), len(source)
        else:
            digest, size = await anyio.to_thread.run_sync(hash_file, path)
        desc = Descriptor(media_type, digest, size)

        async def op(ep: RegistryHost) -> Descriptor:
            # Existence is checked on the push endpoint itself, never on a pull-only mirror.
            head = s.url(ep, f"/{ref.repository}/blobs/{digest}")
            response = await s.request(ep, ref.repository, "HEAD", head, actions=PUSH)
            await response.aclose()
            if response.is_success:
                return desc
            extra = [repository_scope(mount_from, PULL)] if mount_from else []
            params = {"mount": str(digest), "from": mount_from} if mount_from else None
            url = s.url(ep, f"/{ref.repository}/blobs/uploads/", params)
            response = await s.request(
                ep,
                ref.repository,
                "POST",
                url,
                actions=PUSH,
                extra_scopes=extra,
                content=b"",
                follow=False,
            )
            if response.status_code == 201 and mount_from:
                return desc
            if response.status_code != 202 or "location" not in response.headers:
                raise await status_error(response, f"start upload of {digest} to {ref.name}")
            location = response.url.join(response.headers["location"])
            if size <= self.monolithic_max_bytes:
                if path is None:
                    assert isinstance(source, bytes)
                    data = source
                else:
                    data = await anyio.to_thread.run_sync(path.read_bytes)
                await self._finish(ep, ref, location, digest, data)
                return desc
            assert path is not None
            start = 0
            while chunk := await anyio.to_thread.run_sync(_read_at, path, start, self.chunk_bytes):
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{start + len(chunk) - 1}",
                }
                response = await s.request(
                    ep,
                    ref.repository,
                    "PATCH",
                    location,
                    actions=PUSH,
                    headers=headers,
                    content=chunk,
                    follow=False,
                )
                if response.status_code != 202 or "location" not in response.headers:
                    raise await status_error(
                        response, f"upload chunk at {start} of {digest} to {ref.name}"
                    )
                location = response.url.join(response.headers["location"])
                start += len(chunk)
            await self._finish(ep, ref, location, digest, b"")
            return desc

        return await s.each_endpoint(ref, CAP_PUSH, f"push blob {ref.name}@{digest}", op)

    async def _finish(
        self, ep: RegistryHost, ref: Reference, location: httpx.URL, digest: Digest, data: bytes
    ) -> None:
        url = location.copy_merge_params({"digest": str(digest)})
        response = await self._s.request(
            ep,
            ref.repository,
            "PUT",
            url,
            actions=PUSH,
            headers={"Content-Type": "application/octet-stream"},
            content=data,
            follow=False,
        )
        if response.status_code not in (201, 204):
            raise await status_error(response, f"finish upload of {digest} to {ref.name}")

    async def push_manifest(
        self,
        ref: Reference,
        data: bytes,
        media_type: str,
        *,
        tag: str | None = None,
        update_referrers_tag: bool = True,
    ) -> PushResult:
        """PUT a manifest (or index) by `tag` (default: the reference's tag) or by digest.

        If the manifest has a `subject` and the registry does not answer `OCI-Subject`, the
        tag-schema referrers index of the subject is updated (unless disabled). Raises
        UnauthorizedError, UnexpectedResponseError (rejected), TransportError.
        """
        s = self._s
        desc = Descriptor.of(media_type, data)
        target = tag or ref.tag or str(desc.digest)

        async def op(ep: RegistryHost) -> PushResult:
            url = s.url(ep, f"/{ref.repository}/manifests/{target}")
            response = await s.request(
                ep,
                ref.repository,
                "PUT",
                url,
                actions=PUSH,
                headers={"Content-Type": media_type},
                content=data,
            )
            if not response.is_success:
                raise await status_error(response, f"push manifest {ref.name}:{target}")
            returned = response.headers.get("docker-content-digest")
            if returned and returned != desc.digest:
                raise DigestMismatchError(
                    f"push manifest {ref.name}:{target}: registry stored {returned}, "
                    f"sent {desc.digest}",
                    url=str(url),
                )
            subject = subject_of(data)
            indexed = "oci-subject" in response.headers
            updated = False
            if subject is not None and not indexed and update_referrers_tag:
                updated = await self._referrers.add_to_tag(
                    ep, ref, subject, referrer_descriptor(media_type, data)
                )
            return PushResult(desc, indexed, updated)

        return await s.each_endpoint(ref, CAP_PUSH, f"push manifest {ref.name}:{target}", op)
