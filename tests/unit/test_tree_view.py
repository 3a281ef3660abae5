"""build_tree over a `ZtocView` (the lazy mount path) equals build_tree over decoded entries."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from index.model import FileMetadata
from index.ztoc_codec import ZtocView, encode_ztoc
from snapshotter.fs.tree import build_tree, header_offsets
from tests.support.fuselayers import ztoc_for_layer


def layer_blob(path: Path) -> Path:
    """A gzip layer whose headers are not all one block: PAX long names, xattrs, data."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(40):
            name = f"dir{i % 3}/" + ("long-" * (i % 30)) + f"file{i}"
            data = bytes([i]) * (i * 977)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000 + i
            if i % 7 == 0:
                info.pax_headers = {"SCHILY.xattr.user.k": f"v{i}"}
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def test_view_header_offsets_and_tree_match_decoded_entries(tmp_path: Path) -> None:
    view = ZtocView(encode_ztoc(ztoc_for_layer(layer_blob(tmp_path / "layer.tar.gz"))))
    files = cast(Sequence[FileMetadata], view)  # as RemoteMounter passes it
    entries = list(view)
    offsets = header_offsets(files)
    assert offsets == header_offsets(entries)
    assert len(set(offsets)) == len(entries) and offsets[0] == 0
    # headers of long names take more than one block somewhere
    assert any(e.uncompressed_offset - h > 512 for e, h in zip(entries, offsets, strict=True))
    a, b = build_tree(files), build_tree(entries)
    assert [getattr(a, s) for s in type(a).__slots__] == [getattr(b, s) for s in type(b).__slots__]
