"""The local fallback for a layer the index does not cover: download, decompress, apply.

The blob is streamed from the registry into a temporary file (verified against the layer
digest by the client), decompressed (gzip, zstd or plain tar by media type) and applied into
the snapshot's empty `fs` directory with OCI whiteouts converted to overlayfs form:
`.wh.<name>` becomes a character device 0/0 named `<name>`, `.wh..wh..opq` sets
`trusted.overlay.opaque=y` (`user.overlay.opaque` with `userxattr`) on its directory. The
uncompressed stream is hashed on the way and must equal the image config's
`rootfs.diff_ids` entry for the layer. Synchronous: run it in a worker thread.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import zstandard

from index.digest import Digest
from index.oci.errors import OciError
from index.oci.reference import Reference
from index.oci.registry import RegistryClient

from .apply import apply_tar, clear_dir, decompressed
from .errors import UnpackError


def layer_diff_id(
    client: RegistryClient, ref: Reference, manifest: Digest, layer: Digest
) -> tuple[Digest, str]:
    """The diffID and media type of `layer` in image manifest `manifest`.

    Raises UnpackError when the manifest or config cannot be read or does not list the layer.
    """
    try:
        _, data = client.get_manifest(ref, manifest)
        doc = json.loads(data)
        layers = doc["layers"]
        position = next(i for i, d in enumerate(layers) if d.get("digest") == layer)
        config = json.loads(client.read_blob(ref, Digest(doc["config"]["digest"])))
        diff_id = Digest(config["rootfs"]["diff_ids"][position])
        return diff_id, str(layers[position].get("mediaType", ""))
    except StopIteration as e:
        raise UnpackError(f"layer {layer} is not in image manifest {ref.name}@{manifest}") from e
    except (OciError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UnpackError(f"image {ref.name}@{manifest}: cannot read diffID of {layer}: {e}") from e


def unpack_layer(
    client: RegistryClient,
    ref: Reference,
    manifest: Digest,
    layer: Digest,
    dest: Path,
    tmp_dir: Path,
    *,
    userxattr: bool = False,
) -> int:
    """Download `layer` of image `manifest` and apply it into the empty directory `dest`.

    Returns the compressed bytes downloaded. On failure `dest` is emptied again and
    UnpackError raised (download, digest, decompress, apply or diffID mismatch).
    """
    diff_id, media_type = layer_diff_id(client, ref, manifest, layer)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="layer-", dir=tmp_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            desc = client.fetch_blob(ref, layer, tmp)
        except OciError as e:
            raise UnpackError(f"downloading {ref.name}@{layer}: {e}") from e
        try:
            with decompressed(tmp, media_type) as stream:
                got = apply_tar(stream, dest, userxattr=userxattr)
        except (OSError, EOFError, zstandard.ZstdError) as e:
            raise UnpackError(f"decompressing {ref.name}@{layer}: {e}") from e
        if got != diff_id:
            raise UnpackError(
                f"layer {layer}: uncompressed content hashes to {got}, config says {diff_id}"
            )
        return desc.size
    except BaseException:
        clear_dir(dest)
        raise
    finally:
        tmp.unlink(missing_ok=True)
