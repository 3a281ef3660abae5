"""The daemon counts FUSE requests per handler (`fuseOps` in `<root>/status.json`): a container
reading files of a lazily pulled image through its overlayfs view shows up as at least one
read per file, with names looked up or listed and the trio thread's CPU time spent in the
handlers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.test_lazy import PY_FILES, Images, open_stack, pushed

pytestmark = pytest.mark.root

__all__ = ["pushed"]  # the module fixture this test shares with test_lazy


def fuse_ops(root: Path) -> dict[str, dict[str, float]]:
    doc = json.loads((root / "status.json").read_text())
    ops = doc.get("fuseOps", {})
    assert isinstance(ops, dict)
    return ops


def count(ops: dict[str, dict[str, float]], op: str) -> int:
    return int(ops.get(op, {}).get("count", 0))


@pytest.mark.parametrize("passthrough", [True, False])
def test_status_counts_fuse_requests_of_a_container(
    pushed: Images, tmp_path: Path, passthrough: bool
) -> None:
    extra = "background_fetch = false\n" + ("" if passthrough else "passthrough = false\n")
    with open_stack(pushed, tmp_path / "stack", extra) as stack:
        stack.pull(stack.lazy_ref)
        root = stack.daemon.root
        before = fuse_ops(root)
        files = " ".join(f"/usr/lib/python3.11/{p}" for p in PY_FILES)
        out = stack.run(stack.lazy_ref, "ops-1", f"cat {files} | wc -c")
        assert int(out.strip()) > 0
        deadline = time.monotonic() + 10  # status.json is rewritten at most once a second
        while (
            count(after := fuse_ops(root), "read") - count(before, "read") < len(PY_FILES)
            or count(after, "release") < count(after, "open") * passthrough
        ):
            assert time.monotonic() < deadline, f"reads not counted: {before} -> {after}"
            time.sleep(0.2)
        doc = json.loads((root / "status.json").read_text())
    assert count(after, "lookup") + count(after, "readdir") > 0
    if passthrough:  # every open is answered, and released
        assert count(after, "open") >= len(PY_FILES), after
        assert count(after, "release") == count(after, "open"), after
        opens = doc["passthrough"]["opens"]
        assert opens["cached"] >= len(PY_FILES) and doc["passthrough"]["copyOff"] is None, doc
    else:  # OPEN is answered ENOSYS once per connection, then never sent; nor is RELEASE
        assert "passthrough" not in doc
        assert count(after, "open") <= 1 and count(after, "release") == 0, after
    assert sum(v["cpuSec"] for v in after.values()) > 0
    assert set(after) <= {
        "lookup",
        "forget",
        "getattr",
        "readlink",
        "open",
        "read",
        "flush",
        "release",
        "opendir",
        "readdir",
        "releasedir",
        "statfs",
        "getxattr",
        "listxattr",
        "access",
    }
