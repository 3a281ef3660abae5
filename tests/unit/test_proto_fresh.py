"""The committed gRPC stubs in snapshotter/api are exactly what proto/generate.sh makes."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(["sh", str(REPO / "proto" / "generate.sh"), str(tmp_path)], check=True)
    fresh = tmp_path / "snapshotter" / "api"
    committed = REPO / "snapshotter" / "api"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix == ".py")
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, (
        f"stale generated stubs {mismatch + errors}: run proto/generate.sh"
    )


def test_wire_names_match_containerd() -> None:
    from snapshotter.api import mount_pb2, snapshots_pb2

    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(m.name for m in svc.methods) == sorted(
        [
            "Prepare",
            "View",
            "Mounts",
            "Commit",
            "Remove",
            "Stat",
            "Update",
            "List",
            "Usage",
            "Cleanup",
        ]
    )
    assert svc.methods_by_name["List"].server_streaming
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    fields = {f.name: f.number for f in snapshots_pb2.CommitSnapshotRequest.DESCRIPTOR.fields}
    assert fields == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4, "parent": 5}
    info = {f.name: f.number for f in snapshots_pb2.Info.DESCRIPTOR.fields}
    assert info == {
        "name": 1,
        "parent": 2,
        "kind": 3,
        "created_at": 4,
        "updated_at": 5,
        "labels": 6,
    }
    kinds = {v.name: v.number for v in snapshots_pb2.DESCRIPTOR.enum_types_by_name["Kind"].values}
    assert kinds == {"UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}
    usage = {f.name: f.number for f in snapshots_pb2.UsageResponse.DESCRIPTOR.fields}
    assert usage == {"size": 1, "inodes": 2}
