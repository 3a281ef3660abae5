"""Metrics end to end (root): containerd 1.6 + CRI pulls an indexed image lazily through a
daemon with `[metrics] address` on, the registry behind a counting proxy; files of the lazy
layers are read through the daemon's FUSE host; `/metrics` is scraped and parsed with
prometheus_client's parser.

What it shows: the registry byte counter equals the layer-blob bytes the proxy sent (read-
ahead and background fetch off, so every fetch is a read's and has finished when the read
returns), every layer counted as a lazy mount, FUSE operations counted by op, the Snapshots
API calls by method and code, and `status` printing the same layers as a table.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    Containerd,
    PushedImages,
    require_containerd,
    start_containerd,
)
from tests.support.registry import CountingProxy, RegistryServer, start_proxy
from tests.support.snapclient import SnapDaemon, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
DATA = images.File(path="data/blob.bin", size=6 * MIB)
"""A pseudo-random file over several 1 MiB spans (it does not compress)."""
DATA_BYTES = b"".join(images._pseudo_random(DATA.path, 6 * MIB))
NOTE = images.File(path="data/note.txt", data=b"metrics end to end\n")


@dataclass
class Stack:
    proxy: CountingProxy
    daemon: SnapDaemon
    containerd: Containerd
    image: images.Image
    ref: str
    metrics_url: str

    def scrape(self) -> dict[str, Any]:
        r = httpx.get(self.metrics_url, timeout=10)
        assert r.status_code == 200, r.text
        return {f.name: f for f in text_string_to_metric_families(r.text)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(families: dict[str, Any], family: str, sample: str) -> dict[tuple[Any, ...], float]:
    """`sample`'s values in `family`, by their label values (sorted by label name)."""
    out: dict[tuple[Any, ...], float] = {}
    for s in families[family].samples:
        if s.name == sample:
            out[tuple(v for _, v in sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def stack(
    registry: RegistryServer,
    pushed_images: PushedImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    require_containerd()
    base = tmp_path_factory.mktemp("metrics")
    image = images.write_oci_layout(
        base / "image", [images.busybox_layer(), [DATA, NOTE]], tag="v1"
    )
    pushed = f"{registry.host}/metrics/lazy:v1-soci"
    sociable(
        "convert",
        "--span-size",
        str(MIB),
        "--min-layer-size",
        "0",
        f"oci-layout:{image.layout}:{image.tag}",
        pushed,
        root=base / "convert-root",
    )
    port = free_port()
    config = base / "sociable.toml"
    config.write_text(
        '[remote]\nhosts_dir = ""\nbackground_fetch = false\nreadahead_spans = 0\n'
        f'[metrics]\naddress = "127.0.0.1:{port}"\n'
    )
    with (
        start_proxy(registry) as proxy,
        run_daemon(base / "sociable", config=config) as daemon,
        start_containerd(
            base / "containerd",
            proxy_address=daemon.address,
            registry_hosts=[proxy.host, registry.host],
            sandbox_image=pushed_images.pause_ref,
        ) as ctd,
    ):
        yield Stack(
            proxy=proxy,
            daemon=daemon,
            containerd=ctd,
            image=image,
            ref=pushed.replace(registry.host, proxy.host),
            metrics_url=f"http://127.0.0.1:{port}/metrics",
        )


def test_lazy_pull_and_reads_are_counted(stack: Stack) -> None:
    before = stack.scrape()  # the listener answers before anything happened
    assert samples(before, "sociable_lazy_layers", "sociable_lazy_layers") == {(): 0.0}

    pull = subprocess.run(
        [sys.executable, "-m", "index.cli", "pull", "--address", str(stack.containerd.address),
         stack.ref],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
    )  # fmt: skip
    assert pull.returncode == 0, f"{pull.stderr}\n--- daemon ---\n{stack.daemon.log_tail(60)}"

    fuse = stack.daemon.root / "fuse"
    layers = sorted(p for p in fuse.iterdir() if p.name.startswith("snap-"))
    assert len(layers) == 2, layers
    data_layer = next(p for p in layers if (p / "data").exists())
    got = (data_layer / "data" / "blob.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(DATA_BYTES).digest()
    assert (data_layer / "data" / "note.txt").read_bytes() == NOTE.data
    busybox_layer = next(p for p in layers if p != data_layer)
    assert (busybox_layer / "etc" / "passwd").read_bytes().startswith(b"root:")

    m = stack.scrape()
    lazy_digests = [layer.digest for layer in stack.image.layers]
    proxied = sum(
        n for key, n in stack.proxy.bytes_sent.items() if key.endswith(tuple(lazy_digests))
    )
    fetched = samples(m, "sociable_fetch_bytes", "sociable_fetch_bytes_total")
    assert proxied > len(DATA_BYTES) // 2  # the reads did fetch the data layer
    assert fetched == {("registry",): float(proxied)}, stack.proxy.bytes_sent
    latency = samples(m, "sociable_fetch_seconds", "sociable_fetch_seconds_count")
    assert latency[("registry",)] >= 1
    assert "sociable_fetch_errors" not in m or not samples(
        m, "sociable_fetch_errors", "sociable_fetch_errors_total"
    )

    mounts = samples(m, "sociable_layer_mounts", "sociable_layer_mounts_total")
    assert mounts[("remote",)] == 2
    assert samples(m, "sociable_lazy_layers", "sociable_lazy_layers") == {(): 2.0}

    ops = samples(m, "sociable_fuse_operation_seconds", "sociable_fuse_operation_seconds_count")
    for op in ("lookup", "open", "read"):
        assert ops.get((op,), 0) > 0, (op, ops)
    # FUSE passthrough (the default): every open of the three files is answered, and each
    # close is a RELEASE (sent by the kernel in the background: it may come after the scrape)
    deadline = time.monotonic() + 10
    while ops.get(("release",), 0) < 3:
        assert time.monotonic() < deadline, ops
        time.sleep(0.2)
        ops = samples(
            stack.scrape(),
            "sociable_fuse_operation_seconds",
            "sociable_fuse_operation_seconds_count",
        )
    assert ops[("open",)] == 3 and ops[("release",)] == 3, ops
    errors = samples(m, "sociable_fuse_operation_errors", "sociable_fuse_operation_errors_total")
    assert not [key for key in errors if "open" in key], errors

    calls = samples(m, "sociable_grpc_calls", "sociable_grpc_calls_total")
    methods = {method for _, method in calls}
    assert {"Prepare", "Stat", "List"} <= methods, calls
    assert calls[("ALREADY_EXISTS", "Prepare")] >= 2  # a remote snapshot's answer
    call_latency = samples(m, "sociable_grpc_call_seconds", "sociable_grpc_call_seconds_count")
    assert call_latency[("Prepare",)] == sum(
        n for (_, meth), n in calls.items() if meth == "Prepare"
    )

    span_hits = samples(m, "sociable_cache_size_bytes", "sociable_cache_size_bytes")
    assert span_hits[("span",)] >= proxied  # every fetched span went to the cache


def test_status_table_shows_the_lazy_layers(stack: Stack) -> None:
    def table() -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "snapshotter.cli", "--root", str(stack.daemon.root), "status"],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    # The daemon rewrites its status file (which names each layer's image) once a second when
    # it changed; the layers' own status files are rendered on every read.
    deadline = time.monotonic() + 10
    while True:
        lines = table()
        rows = [line.split() for line in lines if line.startswith("snap-")]
        if all(row[1] == stack.ref for row in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stack.daemon.proc is not None
    assert lines[0].startswith(f"daemon: pid {stack.daemon.proc.pid}") and "2 mounted" in lines[0]
    assert len(rows) == 2
    short = {layer.digest.split(":")[1][:12] for layer in stack.image.layers}
    assert {row[2] for row in rows} == short
    assert all(row[1] == stack.ref for row in rows), lines
    assert any(row[3] == "100.0%" for row in rows)  # the data layer was read whole
