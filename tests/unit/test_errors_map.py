"""The one table from domain errors to gRPC status codes (docs/architecture.md, error tables)."""

from __future__ import annotations

import grpc
import pytest
import trio

from snapshotter import errors
from snapshotter.snapshots.grpc_server import STATUS_FOR_ERROR, status_for


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
