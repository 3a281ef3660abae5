"""`sociable pull REF`: pull an image through containerd's CRI so its layers load lazily.

The CRI call needs gRPC, which the `index` package does not import; the command runs
`python -m snapshotter.cri.pull` (installed with the same package) and passes its
exit status through. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

CRIPULL_MODULE = "snapshotter.cri.pull"


def add_parser(sub: Any) -> None:
    """Register `pull` on the `sociable` subcommand parser `sub`."""
    p = sub.add_parser(
        "pull", help="pull an image through containerd's CRI (lazy layers with sociable)"
    )
    p.add_argument("image", help="image reference")
    p.add_argument(
        "--address",
        default="/run/containerd/containerd.sock",
        help="containerd socket (default %(default)s)",
    )
    p.add_argument("--user", default="", help="registry credentials USER[:PASSWORD]")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds (default %(default)s)")
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace, console: Any) -> None:
    """Run the CRI pull; exits with its status when it fails (message already printed)."""
    cmd = [sys.executable, "-m", CRIPULL_MODULE, args.image, "--address", args.address]
    cmd += ["--timeout", str(args.timeout)]
    if args.user:
        cmd += ["--user", args.user]
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise SystemExit(code)
