"""Imports flow one way (docs/architecture.md): `index` never imports `snapshotter`, grpc or
trio, and the pure filesystem tree never imports the FUSE server, its protocol or grpc."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import index

REPO = Path(__file__).resolve().parents[2]


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    return set(out.split())


def _tops(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_index_imports_nothing_from_the_daemon_side() -> None:
    modules = [m.name for m in pkgutil.walk_packages(index.__path__, "index.")]
    assert "index.cli" in modules and "index.oci.registry" in modules
    loaded = _tops(_loaded_after_import(modules))
    assert not loaded & {"snapshotter", "grpc", "trio"}


@pytest.mark.parametrize("module", ["snapshotter.fs.tree", "snapshotter.fs.host"])
def test_pure_fs_modules_do_not_import_fuse_or_grpc(module: str) -> None:
    loaded = _loaded_after_import([module])
    assert "snapshotter" in _tops(loaded)
    assert not loaded & {"snapshotter.fs.fuse", "snapshotter.fs.protocol"}
    assert "grpc" not in _tops(loaded)
