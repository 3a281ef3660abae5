"""The local-unpack fallback as the mounter sees it: download a layer and apply it to `fs`."""

from __future__ import annotations

import shutil
from pathlib import Path

import trio

from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference

from .errors import UnpackError
from .labels import LayerLabels
from .unpack import DEFAULT_UNPACK_TIMEOUT_SEC, unpack_layer


class RegistryUnpacker:
    """Unpacks layers from the registry into snapshot directories, staging under `tmp_dir`.

    Construction empties `tmp_dir` (downloads a killed process left behind; none is in use
    when the daemon starts).
    """

    def __init__(
        self,
        client: AsyncRegistryClient,
        tmp_dir: Path,
        *,
        userxattr: bool,
        timeout_sec: float = DEFAULT_UNPACK_TIMEOUT_SEC,
    ) -> None:
        self._client = client
        self._timeout_sec = timeout_sec
        self._tmp_dir = tmp_dir
        self._userxattr = userxattr
        shutil.rmtree(tmp_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<RegistryUnpacker {self._tmp_dir}>"

    async def unpack(self, ll: LayerLabels, ref: Reference, dest: Path) -> int:
        """Download the layer of `ll` and apply it to `dest`; returns its compressed size
        in bytes. Raises UnpackError (also when it takes longer than `timeout_sec`)."""
        with trio.move_on_after(self._timeout_sec):
            return await unpack_layer(
                self._client,
                ref,
                ll.manifest_digest,
                ll.layer_digest,
                dest,
                self._tmp_dir,
                userxattr=self._userxattr,
            )
        raise UnpackError(f"layer {ll.layer_digest}: not unpacked within {self._timeout_sec} s")
