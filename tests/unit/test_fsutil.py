"""atomic_file: the target holds the old content or the new, never a torn file or a temp."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.fsutil import atomic_file, atomic_write


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
