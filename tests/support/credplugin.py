"""A kubelet credential-provider plugin for tests, speaking the exec protocol.

Run as `python3 credplugin.py [options]` (tests wrap it in a shell script named after the
provider). It reads a `CredentialProviderRequest` on stdin, appends one line (the requested
image) to `--count-file`, and answers according to `--mode` (or the first word of
`--mode-file`, when that file exists, so a test can change it between runs):

- `ok`: a `CredentialProviderResponse` with user `user` and password `token-<run number>`
  for each `--auth-key KEY[=PASSWORD]` (default: the image's registry host);
- `fail`: exits 1, printing `SECRET-<run>` on stdout and stderr;
- `garbage`: prints `not json SECRET-<run>` and exits 0;
- `wrong-version`: answers in another apiVersion;
- `hang`: ignores SIGTERM and sleeps for an hour.

`--delay SEC` sleeps before answering (to hold concurrent callers in one run).
`--password-ttl SEC` makes the default password `token-<run>-until-<unix time>`, valid for
SEC seconds from the run: a token server checks it with `password_fresh`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

UNTIL = "-until-"


def password_fresh(password: str, now: float | None = None) -> bool:
    """True for a `token-<run>-until-<unix time>` password whose time has not passed."""
    prefix, sep, until = password.rpartition(UNTIL)
    if not sep or not prefix.startswith("token-") or not until.isdigit():
        return False
    return (time.time() if now is None else now) < int(until)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count-file", required=True)
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--mode-file")
    parser.add_argument("--cache-key-type", default="Registry")
    parser.add_argument("--cache-duration")
    parser.add_argument("--auth-key", action="append", default=[])
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--password-ttl", type=float)
    args = parser.parse_args(argv)

    request = json.load(sys.stdin)
    image = request["image"]
    with open(args.count_file, "a", encoding="utf-8") as f:
        f.write(image + "\n")
    run = len(Path(args.count_file).read_text(encoding="utf-8").splitlines())

    mode = args.mode
    if args.mode_file and Path(args.mode_file).exists():
        mode = Path(args.mode_file).read_text(encoding="utf-8").split()[0]
    if args.delay:
        time.sleep(args.delay)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
    if mode == "fail":
        print(f"SECRET-{run}")
        print(f"plugin failed SECRET-{run}", file=sys.stderr)
        return 1
    if mode == "garbage":
        print(f"not json SECRET-{run}")
        return 0
    api_version = request["apiVersion"]
    if mode == "wrong-version":
        api_version = "credentialprovider.kubelet.k8s.io/v0"
    keys = args.auth_key or [image.partition("/")[0]]
    default_password = f"token-{run}"
    if args.password_ttl is not None:
        default_password += f"{UNTIL}{int(time.time() + args.password_ttl)}"
    response: dict[str, object] = {
        "apiVersion": api_version,
        "kind": "CredentialProviderResponse",
        "cacheKeyType": args.cache_key_type,
        "auth": {
            key: {"username": "user", "password": password or default_password}
            for key, _, password in (k.partition("=") for k in keys)
        },
    }
    if args.cache_duration is not None:
        response["cacheDuration"] = args.cache_duration
    json.dump(response, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
