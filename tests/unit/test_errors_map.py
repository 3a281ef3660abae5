"""The one table from domain errors to gRPC status codes (docs/architecture.md, error tables)."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest
import trio

from snapshotter import errors
from snapshotter.snapshots.grpc_server import STATUS_FOR_ERRNO, STATUS_FOR_ERROR, status_for


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound('snapshot "a" does not exist'), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED),
    ],
)
def test_domain_errors(exc: errors.SnapshotterError, code: grpc.StatusCode) -> None:
    got, message = status_for(exc)
    assert got == code
    assert message == str(exc)


def test_subclasses_use_their_parents_code() -> None:
    class LayerGone(errors.Unavailable):
        pass

    assert status_for(LayerGone("layer 3 unavailable")) == (
        grpc.StatusCode.UNAVAILABLE,
        "layer 3 unavailable",
    )


def test_unexpected_errors_are_unknown_with_type() -> None:
    code, message = status_for(ZeroDivisionError("boom"))
    assert code == grpc.StatusCode.UNKNOWN
    assert "ZeroDivisionError" in message and "boom" in message
    code, _ = status_for(errors.ConfigError("bad"))  # not a request error
    assert code == grpc.StatusCode.UNKNOWN


def test_shutdown_is_unavailable() -> None:
    assert status_for(trio.RunFinishedError())[0] == grpc.StatusCode.UNAVAILABLE


def test_table_covers_every_request_error() -> None:
    request_errors = {
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.InvalidArgument,
        errors.Unavailable,
        errors.Unimplemented,
    }
    assert set(STATUS_FOR_ERROR) == request_errors
    assert len(set(STATUS_FOR_ERROR.values())) == len(request_errors)


@pytest.mark.parametrize(
    ("num", "text"),
    [
        (errno.EROFS, "Read-only file system (EROFS)"),
        (errno.ENOSPC, "No space left on device (ENOSPC)"),
        (errno.EDQUOT, "Disk quota exceeded (EDQUOT)"),
    ],
)
def test_a_root_that_cannot_be_written_is_a_failed_precondition(num: int, text: str) -> None:
    exc = OSError(num, os.strerror(num), "/var/lib/sociable/snapshots/new-x1")
    assert STATUS_FOR_ERRNO[num] == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(exc) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{text}: /var/lib/sociable/snapshots/new-x1",
    )
    # The subclasses the standard library raises too, and a rename names both paths.
    code, message = status_for(PermissionError(num, os.strerror(num), "/a", None, "/b"))
    assert (code, message) == (grpc.StatusCode.FAILED_PRECONDITION, f"{text}: /a -> /b")
    assert status_for(OSError(num, os.strerror(num))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        text,
    )


@pytest.mark.root
def test_a_real_read_only_root_is_a_failed_precondition(tmp_path: Path) -> None:
    """What the service's first write on a read-only root raises (a read-only bind mount:
    root writes through mode bits)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(mount), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        with pytest.raises(OSError) as caught:
            tempfile.mkdtemp(prefix="new-", dir=mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    code, message = status_for(caught.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message.startswith(f"Read-only file system (EROFS): {mount}/new-"), message


@pytest.mark.parametrize("num", [errno.EIO, errno.EACCES, errno.ENOENT, None])
def test_other_os_errors_stay_unknown(num: int | None) -> None:
    exc = OSError(num, "boom", "/x") if num is not None else OSError("no errno")
    code, message = status_for(exc)
    assert code == grpc.StatusCode.UNKNOWN
    assert message.startswith("internal error: ")


def test_a_read_only_or_full_metadata_store_is_a_failed_precondition(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    sqlite3.connect(db).execute("CREATE TABLE t (v BLOB)").connection.commit()
    read_only = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as ro:
        read_only.execute("INSERT INTO t VALUES (1)")
    assert status_for(ro.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"metadata store: {ro.value} (EROFS)",
    )
    full = sqlite3.connect(db)
    full.execute("PRAGMA max_page_count = 2")
    with pytest.raises(sqlite3.OperationalError) as no_space:
        full.execute("INSERT INTO t VALUES (?)", (b"x" * 65536,))
    code, message = status_for(no_space.value)
    assert (code, message) == (grpc.StatusCode.FAILED_PRECONDITION, message)
    assert message.endswith("full (ENOSPC)"), message
    # Any other sqlite error is a bug or a damaged store: UNKNOWN.
    with pytest.raises(sqlite3.OperationalError) as other:
        full.execute("SELECT * FROM missing")
    assert status_for(other.value)[0] == grpc.StatusCode.UNKNOWN
