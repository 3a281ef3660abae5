"""`sociable-snapshotter`: run the daemon, or print/check its configuration.

    sociable-snapshotter [--address SOCKET] [--root DIR] [--config FILE] [--log-level L]
    sociable-snapshotter [--config FILE] config default
    sociable-snapshotter [--config FILE] config check [--containerd-config PATH]
                         [--containerd-version VERSION]
    sociable-snapshotter [--root DIR] status [--json]
    sociable-snapshotter [--config FILE] mirror configure [--hosts-dir DIR] [--mirror URL]
                         [--registry HOST ...] [--default] [--dry-run]
    sociable-snapshotter [--config FILE] mirror unconfigure [--hosts-dir DIR] [--mirror URL]
                         [--registry HOST ...] [--default] [--dry-run]
    sociable-snapshotter install [--dry-run] [--prefix DIR] [--wheelhouse DIR] [--now] ...
    sociable-snapshotter uninstall [--dry-run] [--prefix DIR] [--purge]
    sociable-snapshotter [--root DIR] cleanup-mounts
    sociable-snapshotter [--root DIR] fuse-keeper
    sociable-snapshotter eks user-data --ami al2023|al2 --cluster NAME --bundle-url URL ...

`main()` is the one exit point: an error is one line `sociable-snapshotter: error: ...`
on stderr and the exit status `EXIT_CODES` gives its class (docs/cli.md, "Exit status").
An unexpected exception (a bug) is one line saying so; its traceback is printed only with
`--debug` or SOCIABLE_DEBUG=1. SIGINT or SIGTERM while serving is a clean shutdown (0).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn

import trio

from index.exitpoint import DEBUG_ENV, debug_requested, report, version

from . import config as config_mod
from .configcheck import check_all, installed_containerd_version, is_warning
from .daemon import AddressInUse, Settings, serve
from .errors import ConfigError, SnapshotterError, UsageError
from .install import command as install_command
from .logs import LEVELS, setup_logging
from .mirror.hoststoml import DEFAULT_MIRROR, default_mirror, run_mirror_command
from .remote.status import DaemonNotRunning, json_report, read_status, render_table
from .rootlock import RootLocked

PROG = "sociable-snapshotter"

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
"""`config check` found errors; any other failure; an unexpected exception (a bug)."""
EXIT_USAGE: Final = 2
EXIT_IN_USE: Final = 3
EXIT_LOCAL: Final = 6
EXIT_NOT_RUNNING: Final = 7
"""`status`: no daemon serves the root."""
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (UsageError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (RootLocked, EXIT_IN_USE),
    (DaemonNotRunning, EXIT_NOT_RUNNING),
    (AddressInUse, EXIT_IN_USE),
    (SnapshotterError, EXIT_ERROR),
    (OSError, EXIT_LOCAL),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
)
"""Error class -> exit status; the first row the (unwrapped) error is an instance of wins."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (as UsageError) for `main` to report in one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="containerd proxy snapshotter daemon")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an unexpected error (also {DEBUG_ENV}=1)",
    )
    p.add_argument("--address", help=f"unix socket or fd:// (default {config_mod.DEFAULT_ADDRESS})")
    p.add_argument("--root", help=f"state directory (default {config_mod.DEFAULT_ROOT})")
    p.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default {config_mod.DEFAULT_CONFIG_PATH}; missing default = all defaults)",
    )
    p.add_argument("--log-level", choices=LEVELS, help="log level (default from config: info)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    cfg = sub.add_parser("config", help="print or check the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    cfg_sub.add_parser("default", help="print the full default config file")
    check = cfg_sub.add_parser(
        "check", help="check our config and containerd's (warnings do not fail the check)"
    )
    check.add_argument(
        "--containerd-config",
        type=Path,
        help="containerd config.toml (default from [containerd] config_path)",
    )
    check.add_argument(
        "--containerd-version",
        metavar="VERSION",
        help="containerd's version, e.g. 1.7.27 (default: what `containerd --version` prints)",
    )
    status = sub.add_parser(
        "status", help="print the daemon's state and every lazily mounted layer (a table)"
    )
    status.add_argument(
        "--json", action="store_true", help="JSON lines instead (one per layer, peer, ...)"
    )
    sub.add_parser(
        "cleanup-mounts",
        help="with the daemon stopped: unmount what it keeps for its next start "
        "(running containers lose their lazy layers)",
    )
    sub.add_parser(
        "fuse-keeper",
        help="run the FUSE fd keeper of the root (its systemd unit runs this; it never exits "
        "on its own)",
    )
    mirror = sub.add_parser(
        "mirror", help="make containerd ask this node's registry mirror first (hosts.toml)"
    )
    mirror_sub = mirror.add_subparsers(dest="mirror_command", required=True, metavar="SUBCOMMAND")
    configure = mirror_sub.add_parser(
        "configure", help="put our mirror first in each registry's hosts.toml (merged, backed up)"
    )
    unconfigure = mirror_sub.add_parser(
        "unconfigure", help="take our mirror (and the server it added) out of hosts.toml files"
    )
    for cmd, registries in (
        (configure, "a registry to configure, e.g. docker.io or 10.0.0.5:5000 (repeatable)"),
        (unconfigure, "a registry to unconfigure (repeatable; none and no --default: every one)"),
    ):
        cmd.add_argument(
            "--hosts-dir",
            type=Path,
            help="containerd's registry config_path (default from [remote] hosts_dir)",
        )
        cmd.add_argument(
            "--mirror",
            help=f"the mirror's URL (default http:// and [peers] listen: {DEFAULT_MIRROR})",
        )
        cmd.add_argument(
            "--registry", action="extend", nargs="+", default=[], metavar="HOST", help=registries
        )
        cmd.add_argument(
            "--default",
            action="store_true",
            help="the _default directory (registries without a directory of their own)",
        )
        cmd.add_argument(
            "--dry-run", action="store_true", help="print the diff of every file; change nothing"
        )
    install_command.add_parsers(sub)
    install_command.add_eks_parser(sub)
    return p


def _report_error(error: Exception) -> int:
    """One error of a command that reports each of several (`mirror`), as `main` would."""
    return report(PROG, error, EXIT_CODES, debug=False)


def _settings(args: argparse.Namespace) -> Settings:
    cfg = config_mod.load(args.config)
    return Settings(
        config=cfg,
        address=args.address or cfg.daemon.address,
        root=Path(args.root or cfg.daemon.root),
    )


def run(argv: Sequence[str]) -> int:
    """Run the command line `argv` (without the program name); return the exit code.

    Raises SnapshotterError / OSError (possibly inside an ExceptionGroup from the daemon's
    nurseries) for main() to report.
    """
    args = _parser().parse_args(argv)
    if args.command == "config" and args.config_command == "default":
        sys.stdout.write(config_mod.render_default())
        return 0
    if args.command in ("install", "uninstall"):
        return install_command.run(args, sys.stdout, sys.stderr)
    if args.command == "eks":
        return install_command.run_eks(args, sys.stdout)
    settings = _settings(args)
    if args.command == "mirror":
        hosts_dir = args.hosts_dir or settings.config.remote.hosts_dir
        if not hosts_dir:
            raise UsageError("mirror: give --hosts-dir ([remote] hosts_dir is empty)")
        return run_mirror_command(
            args.mirror_command,
            hosts_dir=Path(hosts_dir),
            registries=args.registry,
            default=args.default,
            mirror=args.mirror or default_mirror(settings.config.peers.listen),
            dry_run=args.dry_run,
            report_error=_report_error,
            out=sys.stdout,
            err=sys.stderr,
        )
    if args.command == "status":
        current = read_status(settings.root)
        if not args.json:
            sys.stdout.write(render_table(current))
            return 0
        report = json_report(current)
        for line in report.lines:
            print(line)
        if report.note:
            print(report.note, file=sys.stderr)
        return 0
    if args.command == "fuse-keeper":
        import os

        from .fs import keeper

        # The long-lived process is the standard-library-only script, not this program.
        argv0 = [sys.executable, "-I", keeper.__file__, "--root", str(settings.root), "--stay"]
        os.execv(sys.executable, argv0)
    if args.command == "cleanup-mounts":
        from .remote.compose import cleanup_mounts

        print(f"{cleanup_mounts(settings.root)} mounts removed under {settings.root}")
        return EXIT_OK
    if args.command == "config":
        path = args.containerd_config or Path(settings.config.containerd.config_path)
        version = args.containerd_version
        findings = check_all(
            settings.config,
            settings.address,
            settings.root,
            path,
            containerd_version=installed_containerd_version() if version is None else version,
        )
        for finding in findings:
            print(finding)
        errors = [f for f in findings if not is_warning(f)]
        if not errors:
            warned = f" ({len(findings)} warnings)" if findings else ""
            print(f"ok: config and {path} look right for {PROG}{warned}")
        return EXIT_ERROR if errors else EXIT_OK
    setup_logging(args.log_level or settings.config.daemon.log_level)
    from .remote.compose import open_remote_mounter  # only the daemon needs FUSE and registries

    trio.run(functools.partial(serve, settings, open_mounter=open_remote_mounter))
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: run, report an error once, exit with its status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = run(argv)
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as e:
        code = report(PROG, e, EXIT_CODES, debug=debug_requested(argv))
    sys.exit(code)


if __name__ == "__main__":
    main()
