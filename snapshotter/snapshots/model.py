"""Plain value types shared by the store, the service and the gRPC layer.

Timestamps are integers in nanoseconds since the Unix epoch (UTC); sizes are in
bytes. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NewType

SnapshotId = NewType("SnapshotId", int)
"""Store-assigned number of a snapshot; names its directory. Never reused."""

LABEL_TARGET_REF = "containerd.io/snapshot.ref"
"""Prepare label naming the chain id containerd wants committed (remote handshake)."""

LABEL_REMOTE = "containerd.io/snapshot/remote"
"""Label this daemon puts on snapshots whose layer is mounted lazily."""

LABEL_REMOTE_VALUE = "remote snapshot"
"""The value of `LABEL_REMOTE` (what containerd's remote snapshotters put there)."""


class Kind(enum.IntEnum):
    """Snapshot kinds; values are those of the wire enum `Kind`."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        """The lowercase name containerd filters use (`kind==active`)."""
        return self.name.lower()


@dataclass(frozen=True)
class Usage:
    """Disk usage: `size_bytes` = sum of st_blocks*512 of unique inodes."""

    size_bytes: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Info:
    """What Stat, List and Update return about one snapshot."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """Where a snapshot lives on disk and what it stacks on.

    `parent_ids` is ordered nearest parent first. `usage` is the stored value,
    meaningful for committed snapshots only.
    """

    id: SnapshotId
    kind: Kind
    parent_ids: tuple[SnapshotId, ...]
    usage: Usage = Usage()
    labels: Mapping[str, str] = field(default_factory=dict)


def quote(s: str) -> str:
    """Quote `s` for an error message, like Go's %q (double quotes, escapes)."""
    return json.dumps(s, ensure_ascii=False)
