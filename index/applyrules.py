"""How a layer's tar entries become files: the rules of containerd's applier, in one place.

Both the lazy layer tree (`snapshotter.fs.tree`, built from a zTOC) and the local applier
(`snapshotter.remote.apply`, which writes a layer into a directory) follow these rules, so a
layer looks the same whichever way it is served, and the same as containerd 1.6 unpacks it
(`archive.Apply` with the overlayfs whiteout conversion):

* **Paths** (`clean_path`): a tar name is cleaned like Go's `path.Clean("/" + name)` and taken
  relative to the layer root. `..` never climbs above the root: `../../etc/x` is `etc/x`
  (containerd resolves the parent with `fs.RootPath`, which clamps `..` at the root the same
  way). An entry that cleans to the root itself (`./`, `/`, `..`) is ignored, as containerd
  ignores it ("resolved to root"): the layer root keeps the snapshotter's attributes.
* **Whiteouts**: `.wh.<name>` deletes `<name>` of lower layers and is shown in overlayfs form,
  a character device 0/0 called `<name>`; `.wh..wh..opq` makes its directory opaque, shown as
  the xattr `trusted.overlay.opaque=y` (`user.overlay.opaque` for overlayfs mounted with
  `userxattr`).
* **Extended attributes** (`archive_xattrs`): the PAX records `SCHILY.xattr.<name>` that the
  applier manages to set.
* **Times** (`tar_times_ns`, `bound_time_ns`): PAX times are parsed exactly (decimal, not
  float: `index.tartime`); times before the epoch or beyond int64 nanoseconds become the
  epoch (containerd's `boundTime`); atime is the later of the recorded atime and mtime.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Mapping
from typing import Final

from index.tartime import NANOS_PER_SECOND, pax_time_ns

WHITEOUT_PREFIX: Final = ".wh."
"""A tar entry `<dir>/.wh.<name>` deletes `<dir>/<name>` of the layers below."""
OPAQUE_MARKER: Final = ".wh..wh..opq"
"""A tar entry `<dir>/.wh..wh..opq` hides everything the layers below have in `<dir>`."""
WHITEOUT_PREFIX_BYTES: Final = WHITEOUT_PREFIX.encode()
OPAQUE_MARKER_BYTES: Final = OPAQUE_MARKER.encode()
TRUSTED_OPAQUE_XATTR: Final = "trusted.overlay.opaque"
USER_OPAQUE_XATTR: Final = "user.overlay.opaque"
PAX_XATTR_PREFIX: Final = "SCHILY.xattr."
CAPABILITY_XATTR: Final = "security.capability"
"""Removed by the kernel from a non-directory whenever it is chowned."""

_ARCHIVE_XATTR_NAMESPACES: Final = ("user.", "security.")
_USER_XATTR_PREFIX: Final = "user."
_MAX_TIME_NS: Final = (1 << 63) - 1


def opaque_xattr(userxattr: bool) -> str:
    """The xattr overlayfs reads as the opaque-directory marker (`userxattr` mount option)."""
    return USER_OPAQUE_XATTR if userxattr else TRUSTED_OPAQUE_XATTR


def clean_path(name: str) -> str:
    """A tar entry name as a path relative to the layer root; `""` is the root itself.

    Go's `path.Clean("/" + name)` without the leading slash: `"./usr//bin/"` gives
    `"usr/bin"`, `"a/../../b"` gives `"b"` (`..` stops at the root), `"./"` and `".."` give
    `""`. Never raises; the result never starts with `/` or contains `.` or `..` components.
    """
    tail = name[:-1] if name.endswith("/") else name  # a directory's name ends with "/"
    if tail and tail[0] not in "./" and tail[-1] != "/" and "//" not in tail and "/." not in tail:
        return tail  # already clean (most names): no `normpath`, the cost of a layer's mount
    return posixpath.normpath("/" + name).lstrip("/")


def archive_xattrs(records: Mapping[str, str], mode: int) -> dict[bytes, bytes]:
    """The xattrs containerd's applier sets from one tar header's PAX `records`.

    `mode` is the type (and permission) bits of the inode they land on. Keeps `SCHILY.xattr.*`
    records (prefix stripped) in the `security.` namespace, and in `user.` when `mode` is a
    regular file or a directory (the kernel refuses `user.*` elsewhere with EPERM, which
    containerd ignores); drops `trusted.*` (containerd refuses admin attributes from an archive,
    so an image cannot make a directory opaque with a `trusted.overlay.opaque` record),
    `system.*` and unknown namespaces. Values are UTF-8 (surrogate escapes kept as the original
    bytes). Never raises.
    """
    user_ok = stat.S_ISREG(mode) or stat.S_ISDIR(mode)
    result: dict[bytes, bytes] = {}
    for key, value in records.items():
        if not key.startswith(PAX_XATTR_PREFIX):
            continue
        name = key[len(PAX_XATTR_PREFIX) :]
        if not name.startswith(_ARCHIVE_XATTR_NAMESPACES):
            continue
        if name.startswith(_USER_XATTR_PREFIX) and not user_ok:
            continue
        result[name.encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")
    return result


def bound_time_ns(ns: int) -> int:
    """containerd's `boundTime`: `ns` since the epoch, or 0 when before the epoch or past
    what a 64-bit nanosecond count holds."""
    return ns if 0 <= ns <= _MAX_TIME_NS else 0


def tar_times_ns(pax: Mapping[str, str], header_mtime: float) -> tuple[int, int]:
    """`(atime, mtime)` in nanoseconds as containerd's applier sets them for one tar entry.

    `pax` are the entry's PAX records (text, surrogate-escaped), `header_mtime` the header's
    mtime field in seconds. mtime is the PAX `mtime` record parsed exactly (no float: a
    nanosecond fraction is kept as written), else the header's whole seconds; atime is the
    later of the PAX `atime` record and mtime; both bounded by `bound_time_ns`.

    Raises:
        ValueError: a PAX time record Go's reader would refuse.
    """
    text = pax.get("mtime")
    if text is not None:
        mtime = pax_time_ns(text.encode("utf-8", "surrogateescape"))
    else:
        mtime = int(header_mtime) * NANOS_PER_SECOND
    atime = mtime
    text = pax.get("atime")
    if text is not None:
        atime = max(atime, pax_time_ns(text.encode("utf-8", "surrogateescape")))
    return bound_time_ns(atime), bound_time_ns(mtime)
