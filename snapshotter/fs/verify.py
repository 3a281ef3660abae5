"""Check a file's tar header, read from the layer stream, against its zTOC entry.

Before a regular file's first read, the host reads the header blocks `[header start, data
start)` through the layer reader (so they are digest-checked like any span) and requires that
they parse as exactly one tar member whose name, type, size, mtime, mode, uid, gid and
`SCHILY.xattr.*` records match the tree (docs/format.md). A zTOC that points
into the wrong bytes therefore gives EIO instead of wrong file contents.

The header is compared with what that header recorded (`LayerTree.header_attr`), not with the
inode's final attributes, which later hardlink headers may have changed; its xattr records are
filtered as the tree filters them (`archive_xattrs`: no `trusted.*`, for one).
"""

from __future__ import annotations

import io
import stat
import tarfile

from index.applyrules import archive_xattrs, clean_path, tar_times_ns
from snapshotter.fs.errors import HeaderMismatch
from snapshotter.fs.tree import LayerTree, NodeId


def check_header(header: bytes, tree: LayerTree, node: NodeId, layer: str) -> None:
    """Require that `header` is exactly the tar header of regular-file `node` of `tree`.

    `layer` names the layer in messages.

    Raises:
        HeaderMismatch: the bytes do not parse as one complete header, or a field differs
            from the tree (the message names the field and both values).
    """
    path = tree.path_of(node)
    where = f"layer {layer}: file {path!r}"
    try:
        with tarfile.open(
            fileobj=io.BytesIO(header), mode="r:", errors="surrogateescape"
        ) as archive:
            info = archive.next()
    except (tarfile.TarError, EOFError, ValueError) as e:
        raise HeaderMismatch(f"{where}: tar header does not parse: {e}") from e
    if info is None:
        raise HeaderMismatch(f"{where}: no tar header in {len(header)} bytes")
    if info.offset_data != len(header):
        raise HeaderMismatch(
            f"{where}: header is {info.offset_data} bytes, the zTOC says {len(header)}"
        )
    attr = tree.attr(node)
    recorded = tree.header_attr(node)
    try:
        mtime_ns = tar_times_ns(info.pax_headers, info.mtime)[1]
    except ValueError as e:
        raise HeaderMismatch(f"{where}: tar header mtime does not parse: {e}") from e
    got_xattrs = archive_xattrs(info.pax_headers, stat.S_IFREG)
    checks: list[tuple[str, object, object]] = [
        ("name", clean_path(info.name), path),
        ("type", info.isreg(), stat.S_ISREG(attr.mode)),
        ("size", info.size, attr.size),
        ("mtime", mtime_ns, recorded.mtime_ns),
        ("mode", info.mode & 0o7777, recorded.perm),
        ("uid", info.uid, recorded.uid),
        ("gid", info.gid, recorded.gid),
        ("xattrs", got_xattrs, dict(recorded.xattrs)),
    ]
    for field, got, want in checks:
        if got != want:
            raise HeaderMismatch(f"{where}: tar header {field} is {got!r}, the zTOC says {want!r}")
