"""The `install` and `uninstall` command lines (docs/cli.md), shared by `sociable-snapshotter`
and `python -m snapshotter.install` (what a bundle's `install.sh` runs before anything is
installed: it imports no daemon dependency but tomlkit)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from ..configcheck import ContainerdVersion, parse_containerd_version
from ..errors import UsageError
from .installer import (
    InstallOptions,
    apply_install,
    apply_uninstall,
    next_steps,
    plan_install,
    plan_uninstall,
    print_dry_run,
    print_uninstall_dry_run,
)


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `install` and `uninstall` to a command line's subcommands."""
    install = sub.add_parser(
        "install",
        help="install the program, its systemd units and containerd's settings on this node",
    )
    uninstall = sub.add_parser("uninstall", help="undo `install` (files restored byte for byte)")
    for cmd in (install, uninstall):
        cmd.add_argument(
            "--prefix",
            type=Path,
            default=Path("/"),
            help="read and write every path under DIR (default /)",
            metavar="DIR",
        )
        cmd.add_argument(
            "--dry-run", action="store_true", help="print the diff of every file; change nothing"
        )
    install.add_argument(
        "--wheelhouse",
        type=Path,
        metavar="DIR",
        help="wheels of the program and its dependencies (default: next to the program, "
        "or dist/wheelhouse of a source checkout)",
    )
    install.add_argument(
        "--containerd-version",
        metavar="X.Y.Z",
        help="the node's containerd version (default: `containerd --version`)",
    )
    install.add_argument(
        "--containerd-config",
        type=PurePosixPath,
        metavar="PATH",
        help="containerd's config file to merge into (default [containerd] config_path); "
        "EKS AL2: /etc/eks/containerd/containerd-config.toml",
    )
    install.add_argument(
        "--no-containerd-config",
        action="store_true",
        help="leave containerd's config alone (something else writes it: EKS nodeadm)",
    )
    install.add_argument(
        "--no-kubelet", action="store_true", help="leave kubelet's configuration alone"
    )
    install.add_argument(
        "--now",
        action="store_true",
        help="also start the units (an upgrade restarts the daemon's service only), and "
        "restart containerd and kubelet if their config changed",
    )
    uninstall.add_argument(
        "--purge",
        action="store_true",
        help="also remove the daemon's root (/var/lib/sociable) and files edited since install",
    )


def parse_version(text: str) -> ContainerdVersion:
    """`1.7.27`, `v2.1.0` (or `1.7`: patch 0). Raises UsageError."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)", text)
    version = (
        ContainerdVersion(int(m.group(1)), int(m.group(2)), 0)
        if m is not None
        else parse_containerd_version(text)
    )
    if version is None or len(text.split()) != 1:
        raise UsageError(
            f"--containerd-version {text!r}: give MAJOR.MINOR.PATCH, e.g. 1.7.27 or 2.1.0"
        )
    return version


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run `install` or `uninstall` (`args.command`); return the exit status. Raises
    InstallError, ConfigError, OSError for the exit point."""
    if not args.dry_run and args.prefix.resolve() == Path("/") and os.geteuid() != 0:
        raise UsageError(f"{args.command} changes system files: run it as root (or --prefix DIR)")
    if args.command == "uninstall":
        uplan = plan_uninstall(args.prefix, purge=args.purge)
        if uplan.manifest is None:
            print(f"nothing to uninstall under {args.prefix} (no install manifest)", file=out)
            return 0
        if args.dry_run:
            print_uninstall_dry_run(uplan, out)
        else:
            apply_uninstall(uplan, out)
        for note in uplan.notes:
            print(note, file=err)
        return 0
    opts = InstallOptions(
        prefix=args.prefix,
        wheelhouse=args.wheelhouse,
        containerd_version=(
            parse_version(args.containerd_version) if args.containerd_version else None
        ),
        containerd_config=args.containerd_config,
        containerd=not args.no_containerd_config,
        kubelet=not args.no_kubelet,
        now=args.now,
    )
    plan = plan_install(opts)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=err)
    if args.dry_run:
        print_dry_run(plan, out)
        return 0
    if plan.nothing_to_do:
        print("nothing to do: this node already has this install", file=out)
    else:
        apply_install(plan, now=args.now, out=out)
        print(f"installed sociable {plan.wheelhouse.version}", file=out)
    for note in [*plan.notes, *next_steps(plan, now=args.now)]:
        print(note, file=err)
    return 0


def add_eks_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `eks user-data` to a command line's subcommands."""
    eks = sub.add_parser("eks", help="EKS node launch user data that installs sociable")
    eks_sub = eks.add_subparsers(dest="eks_command", required=True, metavar="SUBCOMMAND")
    ud = eks_sub.add_parser("user-data", help="print the user data of a launch template")
    ud.add_argument(
        "--ami", choices=("al2023", "al2"), required=True, help="Amazon Linux 2023 or 2"
    )
    ud.add_argument("--cluster", required=True, metavar="NAME", help="the EKS cluster's name")
    ud.add_argument(
        "--bundle-url",
        required=True,
        metavar="URL",
        help="where nodes download sociable-<version>-<arch>.tar.gz (`make dist`)",
    )
    ud.add_argument("--bundle-sha256", default="", metavar="HEX", help="the tarball's sha256")
    ud.add_argument(
        "--api-server-endpoint", default="", metavar="URL", help="the cluster's API server"
    )
    ud.add_argument(
        "--certificate-authority", default="", metavar="B64", help="the cluster's CA, base64"
    )
    ud.add_argument("--cidr", default="", help="the service CIDR (AL2023)")
    ud.add_argument("--dns-cluster-ip", default="", metavar="IP", help="(AL2)")
    ud.add_argument(
        "--containerd-version",
        metavar="X.Y.Z",
        help="the AMI's containerd (AL2023, default 2.1.0: version 3 keys; AL2: what the "
        "node's containerd says)",
    )
    ud.add_argument(
        "--cri-proxy",
        action="store_true",
        help="[cri] enable, and kubelet's image service pointed at the proxy",
    )
    ud.add_argument(
        "--mirror",
        action="store_true",
        help="peers and the registry mirror on; unpacked layers kept in containerd",
    )
    ud.add_argument("--peers-dns", default="", metavar="NAME", help="[peers] dns (with --mirror)")
    ud.add_argument(
        "--python", default="python3.11", help="the node's Python 3.11+ (default python3.11)"
    )
    ud.add_argument("--kubelet-extra-args", default="", metavar="ARGS", help="(AL2)")
    ud.add_argument(
        "--mime",
        action="store_true",
        help="AL2: wrap the script in MIME (a managed node group's launch template)",
    )
    ud.add_argument("-o", "--output", type=Path, help="write here instead of stdout")


def run_eks(args: argparse.Namespace, out: TextIO) -> int:
    """`eks user-data`. Raises UsageError, OSError."""
    from .eks import UserDataOptions, user_data  # PyYAML: not needed by install.sh

    text = user_data(
        UserDataOptions(
            ami=args.ami,
            cluster=args.cluster,
            bundle_url=args.bundle_url,
            bundle_sha256=args.bundle_sha256,
            api_server_endpoint=args.api_server_endpoint,
            certificate_authority=args.certificate_authority,
            cidr=args.cidr,
            dns_cluster_ip=args.dns_cluster_ip,
            containerd_version=(
                parse_version(args.containerd_version) if args.containerd_version else None
            ),
            cri_proxy=args.cri_proxy,
            mirror=args.mirror,
            peers_dns=args.peers_dns,
            python=args.python,
            kubelet_extra_args=args.kubelet_extra_args,
            mime=args.mime,
        )
    )
    if args.output is None:
        out.write(text)
    else:
        args.output.write_text(text)
    return 0


__all__ = ["add_eks_parser", "add_parsers", "parse_version", "run", "run_eks"]
