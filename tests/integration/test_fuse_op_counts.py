"""The daemon counts FUSE requests per handler (`fuseOps` in `<root>/status.json`): a container
reading files of a lazily pulled image through its overlayfs view shows up as reads, with
names looked up or listed and the trio thread's CPU time spent in the handlers; the small
files after a file read are pushed into the page cache, and a container reading them sends
no READ and sees the layer's bytes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from tests.integration.test_lazy import PY_FILES, Images, open_stack, parse_sums, pushed
from tests.support import images

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
        while (  # each file is read, or was pushed after the read of one before it
            count(after := fuse_ops(root), "read")
            + count(after, "push")
            - count(before, "read")
            - count(before, "push")
            < len(PY_FILES)
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
        "push",
    }


def layer_files(image: images.Image, directory: str, suffix: str) -> dict[str, bytes]:
    """The regular files directly in `directory` whose names end in `suffix`, as the image's
    last layer stores them, by absolute path."""
    import gzip
    import tarfile

    out: dict[str, bytes] = {}
    with gzip.open(image.layers[-1].path) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for m in tf:
            name = "/" + m.name.lstrip("./")
            if m.isreg() and name.rsplit("/", 1)[0] == directory and name.endswith(suffix):
                f = tf.extractfile(m)
                assert f is not None
                out[name] = f.read()
    return out


def layer_status(root: Path, digest: str) -> dict[str, object]:
    """The status file of the layer `digest`, under whichever connection serves it."""
    for path in root.glob("fuse*/snap-*/.sociable/status.json"):
        doc = json.loads(path.read_text())
        assert isinstance(doc, dict)
        if doc["digest"] == digest:
            return doc
    raise AssertionError(f"no status file of layer {digest} under {root}")


def test_the_files_after_a_read_are_pushed_and_read_without_a_request(
    pushed: Images, tmp_path: Path
) -> None:
    directory = "/usr/lib/python3.11/json"
    files = layer_files(pushed.image, directory, ".py")
    assert len(files) >= 4, sorted(files)
    want = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    first = min(files)
    layer = pushed.image.layers[-1].digest
    with open_stack(pushed, tmp_path / "stack", "background_fetch = false") as stack:
        stack.pull(stack.lazy_ref)
        root = stack.daemon.root
        # the listing gives the kernel the directory's inodes; the first file's READ pushes
        # the files after it in the layer (the rest of the package)
        stack.run(stack.lazy_ref, "push-1", f"ls {directory} >/dev/null; cat {first} >/dev/null")
        size_of_first = layer_status(root, layer)["bytesServed"]
        assert isinstance(size_of_first, int) and size_of_first > 0
        out = stack.run(stack.lazy_ref, "push-2", f"sha256sum {directory}/*.py")
        after = layer_status(root, layer)
    assert parse_sums(out) == want  # the layer's bytes, from the page cache
    assert after["bytesServed"] == size_of_first, after  # not one READ for the others
    pushed_bytes = after["bytesPushed"]
    assert isinstance(pushed_bytes, int)
    assert pushed_bytes >= sum(len(data) for name, data in files.items() if name != first)
