"""atomic_file: the target holds the old content or the new, never a torn file or a temp."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.fsutil import atomic_file, atomic_write, remove_stale_temps


def test_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new", durable=True)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_failure_keeps_the_old_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]


def test_tmp_dir_elsewhere_on_the_same_filesystem(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    atomic_write(tmp_path / "x", b"1", tmp_dir=tmp)
    assert (tmp_path / "x").read_bytes() == b"1" and not list(tmp.iterdir())


def test_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        atomic_write(tmp_path / "nope" / "x", b"1")


def test_stale_temps_of_a_killed_writer_are_removed_and_nothing_else(tmp_path: Path) -> None:
    # What a writer killed between mkstemp and the rename leaves: a `.tmp-*` file.
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "kept") as f:
        f.write(b"x")
        (tmp_path / ".tmp-left-by-kill").write_bytes(b"half")
        raise KeyboardInterrupt
    (tmp_path / "status.json").write_bytes(b"{}")
    (tmp_path / "tmp-not-ours").write_bytes(b"")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json", "tmp-not-ours"]
    assert remove_stale_temps(tmp_path / "missing") == 0


def test_records_and_root_lock_sweep_their_directories(tmp_path: Path) -> None:
    from snapshotter.remote.records import RecordStore
    from snapshotter.rootlock import lock_root

    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / ".tmp-abc").write_bytes(b"{")
    (tmp_path / ".tmp-status").write_bytes(b"{")
    RecordStore(tmp_path / "remote")
    assert list((tmp_path / "remote").iterdir()) == []
    with lock_root(tmp_path):
        assert not (tmp_path / ".tmp-status").exists()
