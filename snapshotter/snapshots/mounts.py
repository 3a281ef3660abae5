"""Mount specs for snapshots, exactly as containerd 1.6.20's overlay snapshotter.

| kind   | parents | mounts                                                     |
|--------|---------|------------------------------------------------------------|
| ACTIVE | 0       | bind <id>/fs, rw,rbind                                     |
| VIEW   | 0       | bind <id>/fs, ro,rbind                                     |
| VIEW   | 1       | bind <parent>/fs, ro,rbind                                 |
| VIEW   | >=2     | overlay, lowerdir only                                     |
| ACTIVE | >=1     | overlay, workdir=<id>/work, upperdir=<id>/fs, lowerdir=... |

Overlay option order: `index=off` (if the kernel has the parameter),
`userxattr` (if needed), `workdir`, `upperdir`, `lowerdir` with the nearest
parent first. Whoever performs the mount copes with option strings longer than
a page (containerd's mounter changes directory to the common prefix of the
lowerdirs and uses relative paths); see `tests/support/snapclient.py`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .model import Kind, SnapshotId


@dataclass(frozen=True)
class Mount:
    """One mount(2) call minus its target (which the caller chooses)."""

    type: str
    source: str
    options: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class OverlayFeatures:
    """Kernel/namespace facts that change overlay options."""

    index_off: bool = False
    userxattr: bool = False


def detect_overlay_features() -> OverlayFeatures:
    """Probe the running kernel the way containerd's overlay snapshotter does.

    `index=off` is used when /sys/module/overlay/parameters/index exists;
    `userxattr` when the process is not in the initial user namespace (overlay
    then cannot use trusted.* xattrs). Never raises.
    """
    index_off = Path("/sys/module/overlay/parameters/index").exists()
    return OverlayFeatures(index_off=index_off, userxattr=_in_user_namespace())


def _in_user_namespace() -> bool:
    try:
        text = Path("/proc/self/uid_map").read_text()
    except OSError:
        return False
    fields = text.split()
    return fields[:3] != ["0", "0", "4294967295"]


class Layout:
    """Directory layout of a snapshotter root: `<root>/snapshots/<id>/{fs,work}`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"

    def __repr__(self) -> str:
        return f"<Layout {str(self.root)!r}>"

    def dir(self, sid: SnapshotId) -> Path:
        return self.snapshots / str(sid)

    def fs(self, sid: SnapshotId) -> Path:
        return self.dir(sid) / "fs"

    def work(self, sid: SnapshotId) -> Path:
        return self.dir(sid) / "work"


def mounts_for(
    layout: Layout,
    kind: Kind,
    sid: SnapshotId,
    parent_ids: Sequence[SnapshotId],
    features: OverlayFeatures,
) -> list[Mount]:
    """The mounts that present snapshot `sid` (ACTIVE or VIEW).

    `parent_ids` is ordered nearest parent first. Raises ValueError for
    COMMITTED (committed snapshots are not mountable).
    """
    if kind is Kind.COMMITTED:
        raise ValueError("committed snapshots have no mounts")
    if not parent_ids:
        rw = "ro" if kind is Kind.VIEW else "rw"
        return [Mount("bind", os.fspath(layout.fs(sid)), (rw, "rbind"))]
    if kind is Kind.VIEW and len(parent_ids) == 1:
        return [Mount("bind", os.fspath(layout.fs(parent_ids[0])), ("ro", "rbind"))]
    options: list[str] = []
    if features.index_off:
        options.append("index=off")
    if features.userxattr:
        options.append("userxattr")
    if kind is Kind.ACTIVE:
        options.append(f"workdir={layout.work(sid)}")
        options.append(f"upperdir={layout.fs(sid)}")
    lower = ":".join(os.fspath(layout.fs(p)) for p in parent_ids)
    options.append(f"lowerdir={lower}")
    return [Mount("overlay", "overlay", tuple(options))]
