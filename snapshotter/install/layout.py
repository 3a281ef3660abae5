"""Where `install` puts things on a node, each path under `--prefix` (default `/`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

VENV: Final = PurePosixPath("/opt/sociable")
BIN_DIR: Final = PurePosixPath("/usr/local/bin")
PROGRAMS: Final = ("sociable-snapshotter", "sociable")
UNIT_DIR: Final = PurePosixPath("/etc/systemd/system")
DOC_DIR: Final = PurePosixPath("/usr/share/doc/sociable")
ETC_DIR: Final = PurePosixPath("/etc/sociable")
CONFIG: Final = ETC_DIR / "config.toml"
MANIFEST: Final = ETC_DIR / "install.json"
CONTAINERD_DROPIN: Final = UNIT_DIR / "containerd.service.d" / "10-sociable.conf"
KUBELET_DROPIN_DIR: Final = UNIT_DIR / "kubelet.service.d"
BACKUP_SUFFIX: Final = ".pre-sociable"
"""A file `install` changed is kept as `<file>.pre-sociable`, once, until `uninstall`."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Maps a node path (`/etc/...`, as written inside files and shown to people) to the
    path read or written (`<prefix>/etc/...`)."""

    prefix: Path = Path("/")

    def __call__(self, node_path: PurePosixPath | str) -> Path:
        p = PurePosixPath(node_path)
        if not p.is_absolute():
            raise ValueError(f"not an absolute path: {p}")
        return self.prefix.joinpath(*p.parts[1:])

    def node_path(self, path: Path) -> PurePosixPath:
        """The node path of `path` (a path under the prefix)."""
        return PurePosixPath("/") / path.relative_to(self.prefix)

    @property
    def is_root(self) -> bool:
        return self.prefix.resolve() == Path("/")

    @property
    def venv(self) -> Path:
        return self(VENV)


__all__ = [
    "BACKUP_SUFFIX",
    "BIN_DIR",
    "CONFIG",
    "CONTAINERD_DROPIN",
    "DOC_DIR",
    "ETC_DIR",
    "KUBELET_DROPIN_DIR",
    "MANIFEST",
    "PROGRAMS",
    "UNIT_DIR",
    "VENV",
    "Layout",
]
