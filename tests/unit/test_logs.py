"""Structured JSON logs: stable keys, extras, exceptions."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from snapshotter.logs import setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    setup_logging("debug", buf)
    try:
        yield buf
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_record_has_stable_keys_and_extras(stream: io.StringIO) -> None:
    logging.getLogger("snapshotter.test").info(
        "prepared %s", "k", extra={"key": "k", "usage_bytes": 4096}
    )
    rec = json.loads(stream.getvalue())
    assert rec["level"] == "info"
    assert rec["logger"] == "snapshotter.test"
    assert rec["msg"] == "prepared k"
    assert rec["time"].endswith("Z") and "T" in rec["time"]
    assert rec["key"] == "k" and rec["usage_bytes"] == 4096


def test_exception_and_unserialisable_extra(stream: io.StringIO) -> None:
    try:
        raise ValueError("bad layer")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"obj": object()})
    rec = json.loads(stream.getvalue())
    assert rec["level"] == "error"
    assert "ValueError: bad layer" in rec["exc"]
    assert rec["obj"].startswith("<object object")


def test_level_filters_and_rejects_unknown(stream: io.StringIO) -> None:
    setup_logging("warning", stream)
    logging.getLogger("x").info("hidden")
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud")


def test_http_libraries_never_log_request_urls(stream: io.StringIO) -> None:
    setup_logging("debug", stream)
    url = "https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=secret"
    logging.getLogger("httpx").info("HTTP Request: GET %s", url)
    logging.getLogger("httpcore.http11").debug("send_request_headers.started %s", url)
    logging.getLogger("httpx").warning("connection pool full")
    logging.getLogger("snapshotter.x").debug("ours")
    out = stream.getvalue()
    assert "X-Amz-Signature" not in out
    assert "connection pool full" in out and "ours" in out
