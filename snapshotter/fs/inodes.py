"""Inode numbers of the layer host: deterministic per (layer slot, node id).

    inode = (slot << 32) | local

`slot` 0 is the host itself (the FUSE root is inode 1, the kernel's `FUSE_ROOT_ID`). Each layer has a
slot >= 1; within it, local 1 is the state directory, local 2 its status file, and node `n` of
the layer tree is local `n + 3` (the layer root, node 0, is local 3). Because a layer tree
numbers its nodes in tar order, the same layer in the same slot always gives the same inodes,
so a restarted server answers for inodes the kernel already knows.
"""

from __future__ import annotations

from typing import Final, NewType

from snapshotter.fs.tree import MAX_NODES, NodeId

InodeNo = NewType("InodeNo", int)
"""A FUSE inode number as the kernel sees it."""

FUSE_ROOT_INODE: Final = InodeNo(1)
STATE_DIR_LOCAL: Final = 1
STATUS_FILE_LOCAL: Final = 2
NODE_BASE: Final = 3
MAX_SLOT: Final = (1 << 31) - 1
"""Slots stay below 2**31 so inode numbers stay below 2**63 (positive as signed 64-bit)."""
_LOW_MASK: Final = (1 << 32) - 1


def make_inode(slot: int, local: int) -> InodeNo:
    """The inode of `local` in layer `slot`. Raises `ValueError` when either is out of range."""
    if not 1 <= slot <= MAX_SLOT:
        raise ValueError(f"layer slot {slot} outside 1..{MAX_SLOT}")
    if not 1 <= local <= _LOW_MASK:
        raise ValueError(f"local inode {local} outside 1..{_LOW_MASK}")
    return InodeNo((slot << 32) | local)


def node_inode(slot: int, node: NodeId) -> InodeNo:
    """The inode of tree node `node` in layer `slot`."""
    if not 0 <= node < MAX_NODES:
        raise ValueError(f"node id {node} outside 0..{MAX_NODES - 1}")
    return make_inode(slot, node + NODE_BASE)


def split_inode(inode: int) -> tuple[int, int]:
    """(slot, local) of an inode number; slot 0 means the host's own inodes."""
    return inode >> 32, inode & _LOW_MASK


def local_to_node(local: int) -> NodeId | None:
    """The tree node for a local inode number, or None for the reserved state inodes."""
    return NodeId(local - NODE_BASE) if local >= NODE_BASE else None
