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
    if _plain_header_matches(header, tree, node, path):
        return
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


def _plain_header_matches(header: bytes, tree: LayerTree, node: NodeId, path: str) -> bool:
    """The common case without `tarfile` (most of the cost of a small file's push): one
    512-byte header of a regular file (`0`), no PAX or GNU records before it, decoded as
    `tarfile` decodes it (`_number`, `_text`, `_checksum_ok`). True only when every field
    `check_header` compares matches; anything else (every mismatch too) is left to the full
    check, which then accepts or names the field."""
    if len(header) != _BLOCK or header[156:157] != b"0":
        return False
    try:
        if not _checksum_ok(header):
            return False
        name = _text(header[0:100])
        prefix = _text(header[345:500])
        if prefix:
            name = prefix + "/" + name
        size = _number(header[124:136])
        mtime_ns = tar_times_ns({}, _number(header[136:148]))[1]
        mode = _number(header[100:108])
        uid = _number(header[108:116])
        gid = _number(header[116:124])
    except ValueError:
        return False
    attr = tree.attr(node)
    recorded = tree.header_attr(node)
    return (
        clean_path(name) == path
        and stat.S_ISREG(attr.mode)
        and size == attr.size
        and mtime_ns == recorded.mtime_ns
        and mode & 0o7777 == recorded.perm
        and uid == recorded.uid
        and gid == recorded.gid
        and not recorded.xattrs
    )


_BLOCK = 512


def _text(field: bytes) -> str:
    """A NUL-terminated name field, as `tarfile` decodes names here."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric field: octal text (NULs and spaces around it), or base-256 when its first
    byte is 0x80 or 0xff. Raises ValueError."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).decode("ascii").strip()
    return int(text or "0", 8)


def _checksum_ok(header: bytes) -> bool:
    """Whether the header's checksum field holds its sum (the field as spaces), of its bytes
    unsigned or, as old tar writers summed them, signed. Raises ValueError."""
    want = _number(header[148:156])
    blanked = header[:148] + b"        " + header[156:]
    unsigned = sum(blanked)
    if want == unsigned:
        return True
    return want == unsigned - 256 * (len(blanked) - len(blanked.translate(None, _HIGH)))


_HIGH = bytes(range(128, 256))
