"""`install` and `uninstall`: plan every change first, then make them, recorded in a manifest.

`plan_install` reads only (every file's new bytes, the venv and links to make); `--dry-run`
prints the plan's diffs and stops there. `apply_install` backs up each file it changes
(`<file>.pre-sociable`, once), writes the files atomically, builds the venv, links the
programs and records each step in `/etc/sociable/install.json` as it goes, so a failure
half-way can still be uninstalled. A second `install` with the same wheelhouse finds
nothing to change. `uninstall` undoes what the manifest lists: changed files get their
original bytes back, created ones are removed (a file edited since install is kept, and
said so), then the venv, the links and the directories install made.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

from .. import config as config_mod
from ..config import Config
from ..configcheck import (
    ContainerdVersion,
    installed_containerd_version,
    parse_containerd_version,
)
from ..mountinfo import mounts_under
from . import manifest as manifest_mod
from . import venv as venv_mod
from .containerd import OurSettings, merge
from .files import (
    FileChange,
    backup_path,
    existing_mode,
    make_dirs,
    read_bytes,
    sha256,
    write_file,
)
from .kubelet import plan_kubelet
from .layout import BIN_DIR, CONFIG, MANIFEST, PROGRAMS, VENV, Layout
from .manifest import FileRecord, Manifest
from .units import SERVICE, InstallError, plan_files, source_dir, unit_names

SYSTEMCTL_TIMEOUT_SEC = 120
REMOVED_SUFFIX = ".sociable-edited"
"""A file edited after install is kept as `<file>.sociable-edited` when its original comes
back."""


@dataclass(frozen=True, slots=True)
class InstallOptions:
    prefix: Path = Path("/")
    wheelhouse: Path | None = None
    containerd_version: ContainerdVersion | None = None
    containerd_config: PurePosixPath | None = None
    """Node path of containerd's config (default: `[containerd] config_path`)."""
    containerd: bool = True
    kubelet: bool = True
    now: bool = False


@dataclass
class InstallPlan:
    layout: Layout
    config: Config
    wheelhouse: venv_mod.Wheelhouse
    changes: list[FileChange]
    venv: str | None
    """"create", "upgrade" or None (up to date)."""
    links: list[tuple[Path, Path]]
    units: list[str]
    old: Manifest | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    containerd_changed: bool = False
    kubelet_changed: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return not self.changes and self.venv is None and not self.links


def default_wheelhouse() -> Path:
    """The wheelhouse next to the program (`<bundle>/wheelhouse`), else `dist/wheelhouse`
    of the source checkout."""
    checkout = Path(__file__).resolve().parents[2]
    for candidate in (checkout / "wheelhouse", checkout / "dist" / "wheelhouse"):
        if candidate.is_dir():
            return candidate
    return checkout / "dist" / "wheelhouse"


def load_config(layout: Layout) -> Config:
    """The daemon's config on the node (`/etc/sociable/config.toml`), defaults when absent.
    Raises ConfigError."""
    path = layout(CONFIG)
    return config_mod.load(path) if path.exists() else Config()


def _containerd_change(
    layout: Layout, cfg: Config, opts: InstallOptions, warnings: list[str]
) -> FileChange | None:
    node = opts.containerd_config or PurePosixPath(cfg.containerd.config_path)
    path = layout(node)
    version = opts.containerd_version or parse_containerd_version(installed_containerd_version())
    if version is None:
        raise InstallError(
            "containerd is not on PATH (or says no version): pass --containerd-version"
        )
    old = read_bytes(path)
    try:
        text = None if old is None else old.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InstallError(f"{path}: not UTF-8 text; left as it is") from e
    merged = merge(text, OurSettings.of(cfg), containerd=version, where=str(path))
    warnings.extend(merged.warnings)
    return FileChange(path, old, merged.text.encode(), mode=existing_mode(path))


def plan_install(opts: InstallOptions) -> InstallPlan:
    """Everything `install` would do. Reads only. Raises InstallError, ConfigError
    (ContainerdConfigError, ManifestError), OSError."""
    layout = Layout(opts.prefix)
    wheelhouse = venv_mod.Wheelhouse.open(opts.wheelhouse or default_wheelhouse())
    source = source_dir(wheelhouse.path)
    cfg = load_config(layout)
    old = manifest_mod.load(layout(MANIFEST))
    warnings: list[str] = []
    notes: list[str] = []
    changes = plan_files(layout, source)
    units = unit_names(changes)
    containerd_changed = kubelet_changed = False
    if opts.containerd:
        change = _containerd_change(layout, cfg, opts, warnings)
        if change is not None:
            changes.append(change)
            containerd_changed = change.changed
    else:
        notes.append("containerd's config left alone (--no-containerd-config)")
    if opts.kubelet:
        kubelet = plan_kubelet(layout, cfg)
        changes.extend(kubelet.changes)
        notes.extend(kubelet.notes)
        kubelet_changed = bool(kubelet.changes)
    else:
        notes.append("kubelet left alone (--no-kubelet)")
    recorded = old or Manifest()
    changes = [
        dataclasses.replace(
            c,
            backup=c.old is not None and recorded.file(str(layout.node_path(c.path))) is None,
        )
        for c in changes
        if c.changed
    ]
    venv_python = layout.venv / "bin" / "python"
    if not venv_python.exists():
        venv_action: str | None = "create"
    elif old is None or old.wheel_sha256 != wheelhouse.digest():
        venv_action = "upgrade"
    else:
        venv_action = None
    links = []
    for name in PROGRAMS:
        link, target = layout(BIN_DIR / name), layout.venv / "bin" / name
        if link.is_symlink() and Path(link.readlink()) == target:
            continue
        if link.exists() or link.is_symlink():
            raise InstallError(f"{link} exists and is not a link into {layout.venv}; remove it")
        links.append((link, target))
    return InstallPlan(
        layout,
        cfg,
        wheelhouse,
        changes,
        venv_action,
        links,
        units,
        old,
        warnings,
        notes,
        containerd_changed,
        kubelet_changed,
    )


def print_dry_run(plan: InstallPlan, out: TextIO) -> None:
    for change in plan.changes:
        out.write(change.diff())
    if plan.venv is not None:
        print(
            f"would {plan.venv} the virtual environment {plan.layout.venv}: "
            f"{plan.wheelhouse.wheel.name} and its dependencies from {plan.wheelhouse.path}",
            file=out,
        )
    for link, target in plan.links:
        print(f"would link {link} -> {target}", file=out)
    if plan.nothing_to_do:
        print("nothing to do", file=out)


def _systemd(layout: Layout) -> bool:
    """Whether systemctl may be run: the real root, with systemd running."""
    return (
        layout.is_root
        and Path("/run/systemd/system").is_dir()
        and shutil.which("systemctl") is not None
    )


def _systemctl(*args: str) -> None:
    cmd = ["systemctl", *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_SEC, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise InstallError(f"{' '.join(cmd)}: {e}") from e
    if done.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def apply_install(plan: InstallPlan, *, now: bool, out: TextIO) -> Manifest:
    """Make the planned changes, recording each in the manifest. Raises InstallError,
    OSError (the manifest then lists what was done)."""
    layout = plan.layout
    manifest_path = layout(MANIFEST)
    m = plan.old or Manifest()
    dirs = list(m.dirs)
    records = {r.path: r for r in m.files}

    def save() -> None:
        dirs.extend(str(layout.node_path(d)) for d in make_dirs(manifest_path.parent))
        manifest_mod.save(
            manifest_path,
            dataclasses.replace(m, files=tuple(records.values()), dirs=tuple(dirs)),
        )

    for change in plan.changes:
        node = str(layout.node_path(change.path))
        dirs.extend(str(layout.node_path(d)) for d in make_dirs(change.path.parent))
        old_record = records.get(node)
        backup: str | None = old_record.backup if old_record else None
        if change.backup and change.old is not None:
            bpath = backup_path(change.path)
            if not bpath.exists():
                write_file(bpath, change.old, change.mode)
            backup = str(layout.node_path(bpath))
        created = old_record.created if old_record else change.old is None
        records[node] = FileRecord(node, created, sha256(change.new), backup)
        save()  # before the write: a crash leaves a manifest that knows the backup
        write_file(change.path, change.new, change.mode)
        print(change.describe(), file=out)
    m = dataclasses.replace(m, files=tuple(records.values()), dirs=tuple(dirs))
    if plan.venv is not None:
        m = dataclasses.replace(m, venv=str(VENV))
        save()
        dirs.extend(str(layout.node_path(d)) for d in make_dirs(layout.venv.parent))
        venv_mod.build(layout.venv, plan.wheelhouse, fresh=plan.venv == "create")
        print(f"{plan.venv}d {layout.venv} ({plan.wheelhouse.wheel.name})", file=out)
    m = dataclasses.replace(
        m, version=plan.wheelhouse.version, wheel_sha256=plan.wheelhouse.digest()
    )
    links = list(m.symlinks)
    for link, target in plan.links:
        dirs.extend(str(layout.node_path(d)) for d in make_dirs(link.parent))
        link.symlink_to(target)
        links.append(str(layout.node_path(link)))
        print(f"linked {link} -> {target}", file=out)
    m = dataclasses.replace(m, symlinks=tuple(dict.fromkeys(links)))
    if _systemd(layout):
        _systemctl("daemon-reload")
        _systemctl("enable", *plan.units)
        m = dataclasses.replace(m, units=tuple(plan.units))
        if now:
            # Start what is stopped; restart only the daemon (new code adopts the FUSE
            # connection). Other units, the FUSE keeper among them, are never restarted:
            # restarting the keeper would cut running containers off their lazy layers.
            _systemctl("start", *plan.units)
            if plan.venv == "upgrade" and SERVICE in plan.units:
                _systemctl("restart", SERVICE)
            if plan.containerd_changed:
                _systemctl("try-restart", "containerd.service")
            if plan.kubelet_changed:
                _systemctl("try-restart", "kubelet.service")
    save()
    return m


def next_steps(plan: InstallPlan, *, now: bool) -> list[str]:
    if _systemd(plan.layout):
        if now:
            return []
        restart = ["containerd"] if plan.containerd_changed else []
        restart += ["kubelet"] if plan.kubelet_changed else []
        steps = [f"next: systemctl start {' '.join(plan.units)}"]
        if plan.venv == "upgrade":
            steps.append(f"next: systemctl restart {SERVICE} (not the other units)")
        if restart:
            steps.append(f"next: systemctl restart {' '.join(restart)}")
        return steps
    return [
        "systemd is not running here (or --prefix is set): enable and start "
        f"{', '.join(plan.units)} on the node"
    ]


# -- uninstall --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undo:
    """One file's way back: `path` goes from `current` to `restored` (None: removed)."""

    path: Path
    current: bytes | None
    restored: bytes | None
    backup: Path | None = None
    keep_current_as: Path | None = None
    note: str = ""

    def diff(self) -> str:
        if self.restored is None:
            if self.current is None:
                return ""
            return (
                FileChange(self.path, self.current, b"")
                .diff()
                .replace(f"+++ {self.path}", "+++ /dev/null", 1)
            )
        return FileChange(self.path, self.current, self.restored).diff()


@dataclass
class UninstallPlan:
    layout: Layout
    manifest: Manifest | None
    undo: list[Undo]
    venv: Path | None
    links: list[Path]
    dirs: list[Path]
    purge: Path | None
    notes: list[str]


def plan_uninstall(prefix: Path, *, purge: bool) -> UninstallPlan:
    """Everything `uninstall` would do. Reads only. Raises ManifestError, InstallError
    (a --purge of a root with mounts under it), OSError."""
    layout = Layout(prefix)
    m = manifest_mod.load(layout(MANIFEST))
    if m is None:
        return UninstallPlan(layout, None, [], None, [], [], None, [])
    cfg = load_config(layout) if layout(CONFIG).exists() else Config()
    undo: list[Undo] = []
    notes: list[str] = []
    for record in reversed(m.files):
        path = layout(record.path)
        current = read_bytes(path)
        edited = current is not None and sha256(current) != record.sha256
        if record.created:
            if current is None:
                continue
            if edited and not purge:
                notes.append(f"kept {path}: edited since install (--purge removes it)")
                continue
            undo.append(Undo(path, current, None))
            continue
        backup = layout(record.backup) if record.backup else None
        original = read_bytes(backup) if backup is not None else None
        if original is None:
            notes.append(f"kept {path}: its original ({backup}) is gone")
            continue
        keep = path.with_name(path.name + REMOVED_SUFFIX) if edited else None
        undo.append(Undo(path, current, original, backup, keep))
    links = [
        layout(s)
        for s in m.symlinks
        if layout(s).is_symlink() and str(layout(s).readlink()).startswith(str(layout.venv))
    ]
    venv = layout(m.venv) if m.venv and layout(m.venv).exists() else None
    dirs = [layout(d) for d in reversed(m.dirs)]
    purge_dir = None
    if purge:
        root = layout(cfg.daemon.root)
        if root.exists():
            if mounts_under(root.resolve()):
                raise InstallError(
                    f"--purge: {root} has mounts under it (stop sociable-snapshotter, then run sociable-snapshotter cleanup-mounts)"
                )
            purge_dir = root
    return UninstallPlan(layout, m, undo, venv, links, dirs, purge_dir, notes)


def print_uninstall_dry_run(plan: UninstallPlan, out: TextIO) -> None:
    for u in plan.undo:
        out.write(u.diff())
    if plan.venv is not None:
        print(f"would remove the virtual environment {plan.venv}", file=out)
    for link in plan.links:
        print(f"would remove {link}", file=out)
    if plan.purge is not None:
        print(f"would remove {plan.purge} (--purge)", file=out)


def apply_uninstall(plan: UninstallPlan, out: TextIO) -> None:
    """Undo the install. Raises InstallError, OSError."""
    layout, m = plan.layout, plan.manifest
    if m is None:
        return
    if m.units and _systemd(layout):
        _systemctl("disable", "--now", *m.units)
    for u in plan.undo:
        if u.restored is None:
            u.path.unlink(missing_ok=True)
            print(f"removed {u.path}", file=out)
            continue
        if u.keep_current_as is not None and u.current is not None:
            write_file(u.keep_current_as, u.current, existing_mode(u.path))
            print(f"kept the edited {u.path} as {u.keep_current_as}", file=out)
        write_file(u.path, u.restored, existing_mode(u.backup or u.path))
        if u.backup is not None:
            u.backup.unlink(missing_ok=True)
        print(f"restored {u.path}", file=out)
    for link in plan.links:
        link.unlink()
        print(f"removed {link}", file=out)
    if plan.venv is not None:
        shutil.rmtree(plan.venv)
        print(f"removed {plan.venv}", file=out)
    if plan.purge is not None:
        shutil.rmtree(plan.purge)
        print(f"removed {plan.purge}", file=out)
    layout(MANIFEST).unlink(missing_ok=True)
    for d in plan.dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            plan.notes.append(f"kept {d}: not empty")
    if m.units and _systemd(layout):
        _systemctl("daemon-reload")


__all__ = [
    "InstallOptions",
    "InstallPlan",
    "UninstallPlan",
    "apply_install",
    "apply_uninstall",
    "default_wheelhouse",
    "load_config",
    "next_steps",
    "plan_install",
    "plan_uninstall",
    "print_dry_run",
    "print_uninstall_dry_run",
]
