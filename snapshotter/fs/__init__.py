"""The lazy layer filesystem: pure layer trees, the multi-layer host, and the FUSE server.

Pure modules (no FUSE protocol): `tree` (one layer's inode tree from its zTOC), `inodes`
(deterministic inode numbers), `host` (all layers in one filesystem, status files, reads),
`readers` (the `LayerReader` seam and local readers), `verify` (tar header checks), `errors`.
The FUSE server (`snapshotter.fs.fuse`, speaking `snapshotter.fs.protocol`), its connections
(`connection`) and their keeper (`keeper`): import them explicitly.
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
