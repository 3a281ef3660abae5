"""The program's virtual environment (`/opt/sociable`): made with the running Python's
`venv`, filled by pip from a wheelhouse with `--no-index` (no network, no compiler)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .files import sha256
from .units import InstallError

WHEEL_PREFIX = "sociable-"
PIP_TIMEOUT_SEC = 600


@dataclass(frozen=True, slots=True)
class Wheelhouse:
    """A directory of wheels holding ours (`sociable-<version>-*.whl`) and its dependencies."""

    path: Path
    wheel: Path
    version: str
    wheels: int

    @classmethod
    def open(cls, path: Path) -> Wheelhouse:
        """Raises InstallError when `path` holds no wheel of ours (or several)."""
        if not path.is_dir():
            raise InstallError(f"wheelhouse {path} is not a directory (build one with `make dist`)")
        wheels = sorted(path.glob("*.whl"))
        ours = [w for w in wheels if w.name.startswith(WHEEL_PREFIX)]
        if len(ours) != 1:
            found = ", ".join(w.name for w in ours) or "none"
            raise InstallError(f"wheelhouse {path}: need exactly one sociable wheel ({found})")
        return cls(path, ours[0], ours[0].name.split("-")[1], len(wheels))

    def digest(self) -> str:
        """sha256 of our wheel: a rebuilt wheel of the same version is an upgrade too."""
        return sha256(self.wheel.read_bytes())


def _run(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_SEC, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise InstallError(f"{what}: {e}") from e
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise InstallError(f"{what} failed (exit {done.returncode}): {tail}")


def build(venv: Path, wheelhouse: Wheelhouse, *, fresh: bool) -> None:
    """Make (`fresh`) or upgrade `venv` with our wheel and its dependencies from the
    wheelhouse only. Raises InstallError."""
    if fresh:
        _run([sys.executable, "-m", "venv", str(venv)], f"python -m venv {venv}")
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--isolated",
        "--no-index",
        "--find-links",
        str(wheelhouse.path),
    ]
    if not fresh:
        cmd.append("--force-reinstall")
    _run([*cmd, str(wheelhouse.wheel)], f"pip install {wheelhouse.wheel.name} into {venv}")


__all__ = ["Wheelhouse", "build"]
