"""`make demo`: sociable's main job on an embedded default, end to end on this machine.

1. start a private registry on a free loopback port (behind a proxy that counts the bytes it
   serves);
2. build a test image from real files (busybox plus the Python standard library, >100 MB);
3. index it with `sociable convert --standalone` (v2 SOCI, no daemon, no root) and push it with
   skopeo;
4. start `sociable-snapshotter` and a private containerd 1.6 using it through CRI;
5. pull the image lazily (`sociable pull`, CRI PullImage) and start a container that checksums a
   few files; compare with the originals and with a full pull into overlayfs;
6. print a summary: time and bytes fetched, lazy vs full.

Everything runs under a temporary directory and is torn down at the end. Steps 4-6 need root.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.support import images
from tests.support.containerd import start_containerd
from tests.support.registry import start_proxy, start_registry
from tests.support.snapclient import run_daemon

FILES = (
    "usr/lib/python3.11/os.py",
    "usr/lib/python3.11/json/decoder.py",
    "usr/lib/python3.11/email/message.py",
    "usr/lib/python3.11/asyncio/base_events.py",
)
K8S = "k8s.io"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd)} failed:\n{proc.stderr}")
    return proc.stdout


def sociable(*args: str) -> str:
    return run(sys.executable, "-m", "index.cli", *args)


def expected_sums(layer: Path) -> dict[str, str]:
    out = {}
    with gzip.open(layer) as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
        for m in tf:
            if m.name in FILES and m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                out["/" + m.name] = hashlib.sha256(f.read()).hexdigest()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sociable-demo-") as tmp_name:
        tmp = Path(tmp_name)
        step("starting a local registry")
        with start_registry(tmp / "registry") as registry, start_proxy(registry) as proxy:
            print(f"registry at {registry.url}, counted through {proxy.url}")

            step("building a test image (busybox + the Python standard library)")
            t0 = time.monotonic()
            image = images.bulk_image()
            total = sum(layer.size for layer in image.layers)
            print(
                f"{len(image.layers)} layers, {total / 1e6:.1f} MB compressed "
                f"({time.monotonic() - t0:.1f} s)"
            )

            step("indexing it: sociable convert --standalone, then skopeo copy")
            out = tmp / "image-soci"
            t0 = time.monotonic()
            print(
                sociable(
                    "--root",
                    str(tmp / "store"),
                    "convert",
                    "--standalone",
                    "--format",
                    "oci-dir",
                    "--min-layer-size",
                    "1000000",
                    str(image.layout),
                    str(out),
                ).rstrip()
            )
            build_s = time.monotonic() - t0
            run(
                "skopeo",
                "copy",
                "--quiet",
                "--all",
                "--dest-tls-verify=false",
                f"oci:{out}",
                f"docker://{registry.host}/demo/python:soci",
            )
            pause = images.pause_image(tmp / "pause")
            images.push(pause, registry.host, "demo/pause", "v1")
            lazy_ref = f"{proxy.host}/demo/python:soci"
            print(f"pushed {lazy_ref}")

            if os.geteuid() != 0:
                print("\n(not root: skipping the containerd part; run `sudo make demo`)")
                return

            step("starting sociable-snapshotter and containerd (CRI snapshotter = sociable)")
            with (
                run_daemon(tmp / "sociable") as daemon,
                start_containerd(
                    tmp / "containerd",
                    proxy_address=daemon.address,
                    registry_hosts=[proxy.host],
                    sandbox_image=f"{proxy.host}/demo/pause:v1",
                ) as ctd,
            ):
                print(f"daemon {daemon.address}, containerd {ctd.address}")
                proxy.bytes_sent.clear()

                step(f"sociable pull {lazy_ref}")
                t0 = time.monotonic()
                print(sociable("pull", "--address", str(ctd.address), lazy_ref).rstrip())
                pull_s = time.monotonic() - t0
                pulled = sum(proxy.bytes_sent.values())

                step("running a container that checksums a few files")
                script = "sha256sum " + " ".join("/" + f for f in FILES)
                t0 = time.monotonic()
                output = ctd.run(
                    lazy_ref, "demo", "/bin/sh", "-c", script, namespace=K8S, timeout=300
                )
                run_s = time.monotonic() - t0
                lazy_total = sum(proxy.bytes_sent.values())
                print(output.rstrip())
                got = {p: s for s, p in (line.split() for line in output.splitlines())}
                want = expected_sums(image.layers[-1].path)
                if got != want:
                    sys.exit(f"demo: checksums differ:\n got {got}\nwant {want}")
                status = run(
                    sys.executable,
                    "-m",
                    "snapshotter.cli",
                    "--root",
                    str(daemon.root),
                    "status",
                    "--json",
                )

                step("for comparison: a full pull of the same image into overlayfs")
                proxy.bytes_sent.clear()
                t0 = time.monotonic()
                ctd.pull(lazy_ref, snapshotter="overlayfs")
                full_s = time.monotonic() - t0
                full_total = sum(proxy.bytes_sent.values())

            step("summary")
            print(
                f"index build: {total / 1e6:.1f} MB of layers in {build_s:.1f} s "
                "(CLI start-up included)"
            )
            print(f"\n{'lazy layer':<14}{'fetched':>10}{'of':>10}{'served to reads':>17}")
            for line in status.splitlines():
                layer = json.loads(line)
                print(
                    f"{layer['digest'][7:19]:<14}{layer['fetchedSize'] / 1e6:>8.2f}MB"
                    f"{layer['totalSize'] / 1e6:>8.2f}MB{layer['bytesServed'] / 1e6:>15.2f}MB"
                    f"  ({layer['fetchedPercent']:.0f}% local)"
                )
            print(f"\n{'':34}{'seconds':>10}{'MB fetched':>12}")
            print(f"{'lazy: pull (index, zTOCs, config)':34}{pull_s:>10.2f}{pulled / 1e6:>12.2f}")
            print(
                f"{'lazy: pull + container run':34}{pull_s + run_s:>10.2f}{lazy_total / 1e6:>12.2f}"
            )
            print(f"{'full pull into overlayfs':34}{full_s:>10.2f}{full_total / 1e6:>12.2f}")
            print(
                f"\n{len(want)} files read in the container matched the image byte for byte; "
                f"the lazy start fetched {100 * lazy_total / max(full_total, 1):.0f}% of what "
                "a full pull fetches (loopback registry: times say little about a real network; "
                "see docs/benchmarks.md)."
            )


if __name__ == "__main__":
    main()
