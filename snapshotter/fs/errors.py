"""The layer filesystem's exceptions.

Every failure the pure tree and host can report is one of these classes; the FUSE adapter
translates them to errno values through exactly one table (`snapshotter.fs.fuse.ERRNO_TABLE`).
Each class documents when you see it.

    FsError
    ├── TreeBuildError        a zTOC cannot be turned into a tree (bad name, hardlink target
    │                         missing or later in the tar, parent is not a directory, bad time)
    ├── NotFound              no such name in a directory, or an inode the host does not know
    ├── NotADirectory         a directory operation on a non-directory
    ├── IsADirectory          a file operation (open for read) on a directory
    ├── NotASymlink           readlink on something that is not a symlink
    ├── NoSuchAttribute       getxattr of an attribute the node does not have
    ├── ReadOnly              an open for writing, or any modifying operation
    ├── PermissionDenied      access() refused by the node's mode bits
    ├── BadHandle             a file or directory handle that is not open
    ├── LayerExists           add_layer with a name (or slot) already in use
    └── LayerReadError        the layer's bytes could not be read or verified (maps to EIO)
        └── HeaderMismatch    the tar header in the stream does not match the zTOC entry
"""

from __future__ import annotations


class FsError(Exception):
    """Base class of every error raised by `snapshotter.fs`."""


class TreeBuildError(FsError):
    """A zTOC's entries do not form a valid layer tree; the message names the entry."""


class NotFound(FsError):
    """A name is not in a directory, or an inode or layer is unknown (ENOENT)."""


class NotADirectory(FsError):
    """A directory operation was asked of a node that is not a directory (ENOTDIR)."""


class IsADirectory(FsError):
    """A file operation was asked of a directory (EISDIR)."""


class NotASymlink(FsError):
    """readlink of a node that is not a symbolic link (EINVAL)."""


class NoSuchAttribute(FsError):
    """The node has no extended attribute of that name (ENODATA/ENOATTR)."""


class ReadOnly(FsError):
    """The filesystem is read-only: open for writing or any modification (EROFS)."""


class PermissionDenied(FsError):
    """The caller's credentials do not allow the access (EACCES)."""


class BadHandle(FsError):
    """A file or directory handle that is not (or no longer) open (EBADF)."""


class LayerExists(FsError):
    """A layer with that name or slot is already mounted in the host (EEXIST)."""


class LayerReadError(FsError):
    """The layer's bytes could not be fetched, verified or inflated (EIO).

    Raised by `LayerReader` implementations; the host records the message as the layer's last
    error in its status file.
    """


class HeaderMismatch(LayerReadError):
    """The tar header read from the layer stream disagrees with the zTOC entry (EIO)."""
