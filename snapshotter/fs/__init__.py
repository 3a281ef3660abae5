"""The lazy layer filesystem: pure layer trees, the multi-layer host, and a pyfuse3 adapter.

Pure modules (no pyfuse3 import): `tree` (one layer's inode tree from its zTOC), `inodes`
(deterministic inode numbers), `host` (all layers in one filesystem, status files, reads),
`readers` (the `LayerReader` seam and local readers), `verify` (tar header checks), `errors`.
`snapshotter.fs.fuse` is the only module that imports pyfuse3; import it explicitly.
"""

from snapshotter.fs.errors import FsError, LayerReadError, TreeBuildError
from snapshotter.fs.host import STATE_DIR_NAME, STATUS_FILE_NAME, LayerHost, LayerStatus
from snapshotter.fs.readers import (
    FetchProgress,
    LayerReader,
    LocalBlobReader,
    LocalTarReader,
    ReportsProgress,
)
from snapshotter.fs.tree import LayerTree, build_tree

__all__ = [
    "STATE_DIR_NAME",
    "STATUS_FILE_NAME",
    "FetchProgress",
    "FsError",
    "LayerHost",
    "LayerReadError",
    "LayerReader",
    "LayerStatus",
    "LocalBlobReader",
    "LocalTarReader",
    "ReportsProgress",
    "TreeBuildError",
    "build_tree",
    "LayerTree",
]
