"""`sociable-snapshotter`: run the daemon, or print/check its configuration.

    sociable-snapshotter [--address SOCKET] [--root DIR] [--config FILE] [--log-level L]
    sociable-snapshotter [--config FILE] config default
    sociable-snapshotter [--config FILE] config check [--containerd-config PATH]
    sociable-snapshotter [--root DIR] status

Exit codes: 0 success; 1 error (message on stderr) or problems found by
`config check`; 2 usage error (argparse). `main()` is the one exit point.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import config as config_mod
from .configcheck import check_all
from .daemon import Settings, serve
from .errors import SnapshotterError
from .logs import LEVELS, setup_logging
from .remote.mounter import open_remote_mounter
from .remote.status import layer_statuses

PROG = "sociable-snapshotter"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="containerd proxy snapshotter daemon")
    p.add_argument("--address", help=f"unix socket or fd:// (default {config_mod.DEFAULT_ADDRESS})")
    p.add_argument("--root", help=f"state directory (default {config_mod.DEFAULT_ROOT})")
    p.add_argument(
        "--config",
        type=Path,
        help=f"TOML config file (default {config_mod.DEFAULT_CONFIG_PATH}; missing default = all defaults)",
    )
    p.add_argument("--log-level", choices=LEVELS, help="log level (default from config: info)")
    sub = p.add_subparsers(dest="command")
    cfg = sub.add_parser("config", help="print or check the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("default", help="print the full default config file")
    check = cfg_sub.add_parser("check", help="check our config and containerd's")
    check.add_argument(
        "--containerd-config",
        type=Path,
        help="containerd config.toml (default from [containerd] config_path)",
    )
    sub.add_parser("status", help="print the status of every lazily mounted layer (JSON lines)")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    cfg = config_mod.load(args.config)
    return Settings(
        config=cfg,
        address=args.address or cfg.daemon.address,
        root=Path(args.root or cfg.daemon.root),
    )


def run(argv: Sequence[str]) -> int:
    """Run the command line `argv` (without the program name); return the exit code.

    Raises SnapshotterError / OSError for main() to report.
    """
    args = _parser().parse_args(argv)
    if args.command == "config" and args.config_command == "default":
        sys.stdout.write(config_mod.render_default())
        return 0
    settings = _settings(args)
    if args.command == "status":
        for line in layer_statuses(settings.root):
            print(line)
        return 0
    if args.command == "config":
        path = args.containerd_config or Path(settings.config.containerd.config_path)
        problems = check_all(settings.config, settings.address, settings.root, path)
        for line in problems:
            print(line)
        if not problems:
            print(f"ok: config and {path} look right for {PROG}")
        return 1 if problems else 0
    setup_logging(args.log_level or settings.config.daemon.log_level)
    trio.run(functools.partial(serve, settings, open_mounter=open_remote_mounter))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run, report errors once, exit with the code."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except SnapshotterError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
