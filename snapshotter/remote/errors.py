"""Errors of the remote-layer package. Each one is a fallback reason, never a failed pull.

    RemoteError
    ├── BadLabels        the Prepare lacks the CRI labels (key `no_cri_labels`)
    ├── NoIndex          the image has no SOCI index: containerd pulls it (key `no_index`)
    ├── NoZtoc           the index has no zTOC for this layer: unpacked locally (`no_ztoc`)
    ├── IndexFetchError  the index or a zTOC could not be fetched or decoded (`index_fetch`)
    ├── MountError       the layer could not be mounted (tree, reader, bind mount) (`mount`)
    ├── UnpackError      the local unpack failed (fetch, gunzip, tar, diffID) (`unpack`)
    └── LazyUnavailable  lazy loading failed to start: every layer is declined (`degraded`)

The `reason` class attribute is the stable value of the `reason` log key.
"""

from __future__ import annotations


class RemoteError(Exception):
    """Base of every error of `snapshotter.remote`."""

    reason = "error"


class BadLabels(RemoteError):
    """The Prepare's labels do not name an image, manifest and layer."""

    reason = "no_cri_labels"


class NoIndex(RemoteError):
    """No SOCI index was found for the image (or every discovery mode is disabled)."""

    reason = "no_index"


class NoZtoc(RemoteError):
    """The image's index has no zTOC for the layer (small, zstd or skipped layer)."""

    reason = "no_ztoc"


class IndexFetchError(RemoteError):
    """The index or a zTOC could not be fetched, verified or decoded."""

    reason = "index_fetch"


class MountError(RemoteError):
    """Building the tree, the reader or the bind mount failed."""

    reason = "mount"


class UnpackError(RemoteError):
    """The local unpack of a layer failed (download, decompress, apply or diffID)."""

    reason = "unpack"


class LazyUnavailable(RemoteError):
    """Lazy loading could not start (cache, store, FUSE, registry client, ...)."""

    reason = "degraded"
