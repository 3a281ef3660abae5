"""`/etc/sociable/install.json`: what `install` did, so that `uninstall` undoes exactly that.

Paths in it are node paths (`/etc/...`); `uninstall --prefix` reads them under its prefix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .files import write_file

FORMAT = 1


class ManifestError(ConfigError):
    """The manifest cannot be read: not JSON, or not written by this program's format."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file install wrote: `created` (absent before) or changed (the original kept at
    `backup`); `sha256` of the bytes install wrote, to tell whether someone edited it since."""

    path: str
    created: bool
    sha256: str
    backup: str | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    version: str = ""
    wheel_sha256: str = ""
    venv: str = ""
    files: tuple[FileRecord, ...] = ()
    symlinks: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    """Directories install created, outermost first (removed when empty)."""
    units: tuple[str, ...] = ()
    """Unit names enabled with systemctl (disabled by uninstall)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def file(self, path: str) -> FileRecord | None:
        return next((f for f in self.files if f.path == path), None)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["format"] = FORMAT
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.pop("format", None) != FORMAT:
                raise ValueError("unknown format")
            raw["files"] = tuple(FileRecord(**f) for f in raw.get("files", ()))
            for key in ("symlinks", "dirs", "units"):
                raw[key] = tuple(raw.get(key, ()))
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise ManifestError(f"{where}: not an install manifest ({e})") from None


def load(path: Path) -> Manifest | None:
    """The manifest at `path`; None when there is none. Raises ManifestError, OSError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, path)


def save(path: Path, manifest: Manifest) -> None:
    """Write the manifest (0600: it names backups of files that may hold secrets)."""
    write_file(path, manifest.to_json(), 0o600)
