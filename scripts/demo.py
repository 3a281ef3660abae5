"""`make demo`: sociable's main job on an embedded default, end to end on this machine.

1. start a private registry behind a realistic link: by default (`--link netns`, root) in a
   network namespace joined by a veth pair whose both ends a `tc` tbf qdisc limits to
   `--rate` (100 Mbit/s), as `tests.bench.bench_lazy` does; `--link loopback` (and any run
   without root) serves it on a free loopback port instead. Either way a proxy on loopback
   in front of it counts the bytes it serves;
2. build a test image from real files (busybox plus the Python standard library, >100 MB);
3. index it with `sociable convert --standalone` (v2 SOCI, no daemon, no root) and push it with
   skopeo (before the link is limited);
4. start `sociable-snapshotter` and a private containerd 1.6 using it through CRI;
5. pull the image lazily (`sociable pull`, CRI PullImage) and start a container that checksums a
   few files; compare with the originals, then pull the same image in full into overlayfs and
   run the same container;
6. print a summary: what the daemon did with each layer (mounted lazily, with the bytes it
   fetched and served; unpacked locally, and why), then time and bytes fetched, lazy vs full.

Everything runs under a temporary directory and is torn down at the end. Steps 4-6 need root.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import images
from tests.support.containerd import start_containerd
from tests.support.registry import CountingProxy, start_proxy, start_registry
from tests.support.snapclient import run_daemon

FILES = (
    "usr/lib/python3.11/os.py",
    "usr/lib/python3.11/json/decoder.py",
    "usr/lib/python3.11/email/message.py",
    "usr/lib/python3.11/asyncio/base_events.py",
)
K8S = "k8s.io"
MIN_LAYER_SIZE = 1_000_000
"""`sociable convert --min-layer-size`: smaller layers get no zTOC (the daemon unpacks them)."""
NS_NAME = "socdemo"
NS_SUBNET = 232
REASONS = {
    "no_ztoc": f"no zTOC: below --min-layer-size {MIN_LAYER_SIZE // 1_000_000} MB",
    "mount": "the lazy mount failed",
}
"""Why the daemon unpacked a layer locally (the `reason` of its `layer unpacked locally` log
line) in words."""


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


@dataclass
class Link:
    """The registry as the demo reaches it: `push_host` (before any limit) and `proxy` (the
    counting proxy on loopback that containerd and the daemon pull through); `limit()` puts
    the rate limit on (a no-op on loopback)."""

    describe: str
    push_host: str
    proxy: CountingProxy
    limit: Callable[[], None]


def quiet_disconnects(proxy: CountingProxy) -> None:
    """A client going away in the middle of an answer (the daemon stopping while its background
    fetch reads a layer over the slow link) is no error worth a traceback after the summary."""
    httpd = proxy._httpd
    if httpd is None:
        return
    default = httpd.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            default(request, client_address)

    httpd.handle_error = handle_error  # type: ignore[method-assign]


@contextlib.contextmanager
def open_link(kind: str, rate: str, workdir: Path) -> Iterator[Link]:
    """The registry behind a `netns` link (root) or on `loopback`; torn down on exit."""
    if kind == "loopback":
        with start_registry(workdir) as registry, start_proxy(registry) as proxy:
            quiet_disconnects(proxy)
            yield Link(
                f"registry on loopback at {registry.url} (no rate limit)",
                registry.host,
                proxy,
                lambda: None,
            )
        return
    from tests.bench.bench_lazy import start_ns_registry
    from tests.support.netns import open_netns

    with open_netns(NS_NAME, NS_SUBNET) as ns, start_ns_registry(ns, workdir) as ns_registry:
        proxy = CountingProxy(f"http://{ns_registry.host}")
        proxy.start()
        quiet_disconnects(proxy)
        try:
            yield Link(
                f"registry in network namespace {ns.name} at {ns_registry.host}, behind a veth "
                f"pair limited to {rate} each way (tc tbf)",
                ns_registry.host,
                proxy,
                lambda: ns.limit(rate),
            )
        finally:
            proxy.stop()


def local_unpacks(daemon_log: Path) -> dict[str, str]:
    """Layer digest -> reason, for every `layer unpacked locally` line of the daemon's log."""
    out = {}
    with contextlib.suppress(OSError):
        for line in daemon_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("msg") == "layer unpacked locally":
                    out[str(record.get("layer"))] = str(record.get("reason", "?"))
    return out


def layer_lines(
    layers: Sequence[images.Layer], status_lines: str, unpacked: dict[str, str]
) -> list[str]:
    """One line per image layer: what the daemon did with it."""
    lazy = {}
    for line in status_lines.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "digest" in doc and "fetchedSize" in doc:
                lazy[doc["digest"]] = doc
    out = [f"{'layer':<14}{'size':>10}  what happened"]
    for layer in layers:
        digest = layer.digest
        size = f"{layer.size / 1e6:.2f}MB"
        if digest in lazy:
            doc = lazy[digest]
            what = (
                f"lazy (FUSE): fetched {doc['fetchedSize'] / 1e6:.2f} MB "
                f"({doc['fetchedPercent']:.0f}%), served {doc['bytesServed'] / 1e6:.2f} MB "
                "to reads"
            )
            if doc.get("bytesPushed", 0) >= 10_000:  # shown in MB: nothing below 0.01
                what += f", pushed {doc['bytesPushed'] / 1e6:.2f} MB to the page cache"
        elif digest in unpacked:
            reason = unpacked[digest]
            what = f"unpacked locally by the daemon ({REASONS.get(reason, reason)})"
        else:
            what = "pulled and unpacked by containerd (the daemon declined it)"
        out.append(f"{digest[7:19]:<14}{size:>10}  {what}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--link",
        choices=("netns", "loopback"),
        default="netns",
        help="where the registry serves: behind a rate-limited veth pair (default; root) or "
        "on loopback",
    )
    parser.add_argument("--rate", default="100mbit", help="tc rate of the netns link")
    args = parser.parse_args(argv)
    link_kind = args.link
    if link_kind == "netns" and os.geteuid() != 0:
        print("(not root: the registry serves on loopback, not behind a limited link)")
        link_kind = "loopback"
    with tempfile.TemporaryDirectory(prefix="sociable-demo-") as tmp_name:
        tmp = Path(tmp_name)
        step("starting a registry")
        with open_link(link_kind, args.rate, tmp / "registry") as link:
            proxy = link.proxy
            print(f"{link.describe}; counted through {proxy.url}")

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
                    str(MIN_LAYER_SIZE),
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
                f"docker://{link.push_host}/demo/python:soci",
            )
            pause = images.pause_image(tmp / "pause")
            images.push(pause, link.push_host, "demo/pause", "v1")
            lazy_ref = f"{proxy.host}/demo/python:soci"
            print(f"pushed {lazy_ref}")
            link.limit()

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

                unpacked = local_unpacks(daemon.log)

                step("for comparison: a full pull of the same image into overlayfs, same container")
                proxy.bytes_sent.clear()
                t0 = time.monotonic()
                ctd.pull(lazy_ref, snapshotter="overlayfs")
                full_s = time.monotonic() - t0
                full_total = sum(proxy.bytes_sent.values())
                t0 = time.monotonic()
                full_output = ctd.run(
                    lazy_ref, "demo-full", "/bin/sh", "-c", script, snapshotter="overlayfs"
                )
                full_run_s = time.monotonic() - t0
                if full_output != output:
                    sys.exit(f"demo: the fully pulled image reads differently:\n{full_output}")

            step("summary")
            print(f"{link.describe}.")
            print(
                f"index build: {total / 1e6:.1f} MB of layers in {build_s:.1f} s "
                "(CLI start-up included)\n"
            )
            print("\n".join(layer_lines(image.layers, status, unpacked)))
            lazy_s, full_total_s = pull_s + run_s, full_s + full_run_s
            print(f"\n{'':36}{'seconds':>10}{'MB fetched':>12}")
            # zTOCs still arriving when the pull returns are counted with the container run
            print(f"{'lazy: pull (index, config, zTOCs)':36}{pull_s:>10.2f}{pulled / 1e6:>12.2f}")
            print(f"{'lazy: pull + container run':36}{lazy_s:>10.2f}{lazy_total / 1e6:>12.2f}")
            print(f"{'full: pull into overlayfs':36}{full_s:>10.2f}{full_total / 1e6:>12.2f}")
            print(
                f"{'full: pull + container run':36}{full_total_s:>10.2f}{full_total / 1e6:>12.2f}"
            )
            if link_kind == "loopback":
                link_note = (
                    "a loopback registry has no bandwidth limit, so the times say little about a "
                    "real network (the default --link netns limits it)"
                )
            else:
                speed = full_total_s / lazy_s if lazy_s > 0 else 0.0
                link_note = (
                    f"over {args.rate} the container ran {speed:.1f}x as fast as after a full "
                    f"pull ({lazy_s:.1f} s against {full_total_s:.1f} s)"
                )
            print(
                f"\n{len(want)} files read in the container matched the image byte for byte; "
                f"the lazy start fetched {100 * lazy_total / max(full_total, 1):.0f}% of what "
                f"a full pull fetches; {link_note}. See docs/benchmarks.md for a larger image."
            )


if __name__ == "__main__":
    main()
