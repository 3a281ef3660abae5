"""Registry faults under a lazy layer: a read returns the right bytes or EIO, never wrong bytes.

A real `sociable-snapshotter` mounts a layer of pseudo-random files (converted into a real
docker-registry) through the Snapshots API; its registry is a `FaultProxy` that injects, into
the Range reads of that layer's blob, one fault kind at a time: 503, 429 with `Retry-After`,
a reset mid-body, a short body with a short Content-Length, a trickling body, a flipped byte,
a redirect to a closed port and a redirect to a host name that does not resolve (`.invalid`).
Each file is read through `<root>/fuse/snap-<id>` and compared with the source:

- a fault on the first requests only: the read retries and returns the right bytes;
- a fault on every request: the read fails with EIO (a trickle is only slow: right bytes);
- the fault stops: the same file reads right at once (no poisoned cache, no stuck state);
- a 429's `Retry-After` delays the retry that long (and a huge one is bounded);
- a seeded random mix of all faults over every file, four readers at once: each read is right
  or EIO; with the faults off every file reads right;
- the daemon keeps serving throughout: the same layer mounts again, an image on a registry
  host that does not resolve is declined, an ordinary Prepare and Commit work.

Background fetch and read-ahead are off, so each file's spans are fetched by its own reads.
Test budget: about 15 s (one daemon, one small image; most faults fail within ~0.5 s; the
chaos suite together: under 120 s).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trio

from index.digest import Digest
from index.oci.client import AsyncRegistryClient
from index.oci.reference import Reference
from snapshotter.lazy.sources import FetchConfig, RegistrySource, SourceUnavailable
from snapshotter.remote import labels as L
from tests.support.chaos import (
    ChaosImage,
    ChaosLayer,
    chaos_seed,
    fuse_dir,
    prepare_remote,
    push_chaos_image,
    read_file,
    write_config,
)
from tests.support.faultproxy import (
    ALL_KINDS,
    Fault,
    FaultKind,
    FaultPlan,
    FaultProxy,
    start_fault_proxy,
)
from tests.support.registry import RegistryServer
from tests.support.snapclient import SnapClient, SnapDaemon, can_mount, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

ATTEMPTS = 3
DAEMON_CONFIG = f"""
background_fetch = false
readahead_spans = 0
memory_cache_spans = 2
fetch_max_attempts = {ATTEMPTS}
fetch_backoff_initial_ms = 20
fetch_backoff_max_ms = 100
request_timeout_sec = 5
"""
FAULTS: dict[FaultKind, Fault] = {
    "status": Fault("status", status=503),
    "throttle": Fault("throttle", retry_after="0"),
    "reset": Fault("reset"),
    "truncate": Fault("truncate"),
    "trickle": Fault("trickle", chunk_bytes=32 * 1024, interval_sec=0.01),
    "flip": Fault("flip"),
    "redirect_dead": Fault("redirect_dead"),
    "dns": Fault("dns"),
}


@dataclass
class Stack:
    proxy: FaultProxy
    daemon: SnapDaemon
    snap: SnapClient
    image: ChaosImage
    layer: ChaosLayer
    dir: Path
    unread: list[str]

    def take(self) -> str:
        """A file no test has read yet (its spans are not local)."""
        return self.unread.pop(0)

    def read(self, name: str) -> bytes | OSError:
        return read_file(self.dir / name)


@pytest.fixture(scope="module")
def image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> ChaosImage:
    reason = can_mount()
    if reason:
        pytest.skip(f"PREREQUISITE MISSING: {reason}")
    return push_chaos_image(
        registry.host,
        registry.url,
        tmp_path_factory.mktemp("chaos-registry-image"),
        "chaos/registry",
        files=40,
    )


@pytest.fixture(scope="module")
def stack(
    registry: RegistryServer, image: ChaosImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("chaos-registry")
    layer = image.layers[0]
    with (
        start_fault_proxy(registry.url, FaultPlan(match=f"/blobs/{layer.digest}")) as proxy,
        run_daemon(base, config=write_config(base, DAEMON_CONFIG)) as daemon,
        contextlib.closing(daemon.client()) as snap,
    ):
        prepare_remote(snap, proxy.host, image, layer)
        yield Stack(
            proxy,
            daemon,
            snap,
            image,
            layer,
            fuse_dir(daemon.root, layer.digest),
            sorted(layer.files),
        )
        assert daemon.alive(), daemon.log_tail(60)


def expect_right(stack: Stack, name: str, what: str) -> None:
    got = stack.read(name)
    assert not isinstance(got, OSError), f"{what}: {name}: {got}\n{stack.daemon.log_tail(30)}"
    assert got == stack.layer.files[name], f"{what}: {name}: WRONG BYTES"


def expect_right_or_eio(stack: Stack, name: str, what: str) -> bool:
    """True for the right bytes, False for EIO; anything else fails the test."""
    got = stack.read(name)
    if isinstance(got, OSError):
        assert got.errno == errno.EIO, f"{what}: {name}: {got!r}"
        return False
    assert got == stack.layer.files[name], f"{what}: {name}: WRONG BYTES"
    return True


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fault_is_retried_fails_cleanly_and_leaves_nothing_behind(
    stack: Stack, kind: FaultKind
) -> None:
    fault = FAULTS[kind]
    match = stack.proxy.plan.match
    # The first requests fail, the retries get through: the right bytes.
    stack.proxy.set_plan(FaultPlan.first(ATTEMPTS - 1, fault, match=match))
    before = stack.proxy.matched
    expect_right(stack, stack.take(), f"{kind} on the first {ATTEMPTS - 1} requests")
    if kind != "trickle":  # slow, not failed: nothing to retry
        assert stack.proxy.matched >= before + ATTEMPTS, "the faults were not retried"
    assert kind in stack.proxy.injected_kinds()

    # Every request fails: EIO (a trickle is slow, not wrong).
    stack.proxy.set_plan(FaultPlan.always(fault, match=match))
    name = stack.take()
    got = stack.read(name)
    if kind == "trickle":
        assert got == stack.layer.files[name], f"trickle: {name}: {got!r:.100}"
    else:
        assert isinstance(got, OSError) and got.errno == errno.EIO, f"{kind}: {name}: {got!r:.100}"

    # The fault stops: the same file reads right at once.
    stack.proxy.clear()
    expect_right(stack, name, f"after {kind} stopped")
    assert stack.daemon.alive(), stack.daemon.log_tail(40)


def test_retry_after_delays_the_retry(stack: Stack) -> None:
    match = stack.proxy.plan.match
    stack.proxy.set_plan(FaultPlan.first(1, Fault("throttle", retry_after="1"), match=match))
    first = stack.proxy.matched
    expect_right(stack, stack.take(), "one 429 with Retry-After: 1")
    stack.proxy.clear()
    waited = stack.proxy.times[first + 1] - stack.proxy.times[first]
    # The jittered backoff alone would retry within 100 ms.
    assert 0.9 <= waited < 10.0, f"retried {waited:.3f} s after a 429 with Retry-After: 1"


def test_huge_retry_after_is_bounded(
    registry: RegistryServer, image: ChaosImage, stack: Stack
) -> None:
    """A `Retry-After` of an hour waits `retry_after_max_sec` at most (the source directly,
    with a small bound)."""
    layer = image.layers[0]
    name = sorted(layer.files)[0]
    size = len(layer.files[name])
    match = stack.proxy.plan.match

    async def fetch(bound: float) -> float:
        config = FetchConfig(
            max_attempts=2, backoff_initial_ms=1, backoff_max_ms=1, retry_after_max_sec=bound
        )
        async with AsyncRegistryClient() as client:
            source = RegistrySource(
                client, Reference.parse(image.ref(stack.proxy.host)), config=config
            )
            started = trio.current_time()
            data = await source.fetch(Digest(layer.digest), 0, size)  # type: ignore[arg-type]
            assert len(data) == size
            return trio.current_time() - started

    stack.proxy.set_plan(FaultPlan.first(1, Fault("throttle", retry_after="3600"), match=match))
    took = trio.run(fetch, 0.5)
    stack.proxy.clear()
    assert 0.4 <= took < 10.0, f"a Retry-After of 3600 s bounded to 0.5 s took {took:.2f} s"

    # A date in the past, or garbage, is no reason to wait.
    for value in ("Wed, 21 Oct 2015 07:28:00 GMT", "soon"):
        stack.proxy.set_plan(FaultPlan.first(1, Fault("throttle", retry_after=value), match=match))
        took = trio.run(fetch, 30.0)
        stack.proxy.clear()
        assert took < 10.0, f"Retry-After {value!r}: waited {took:.2f} s (bound: 30 s)"

    # A 429 on every attempt: the last error says so.
    stack.proxy.set_plan(FaultPlan.always(Fault("throttle", retry_after="0"), match=match))
    with pytest.raises(SourceUnavailable, match="429"):
        trio.run(fetch, 1.0)
    stack.proxy.clear()


def test_seeded_fault_mix_never_serves_wrong_bytes(stack: Stack) -> None:
    seed = chaos_seed("registry fault mix")
    kinds = tuple(
        Fault(f.kind, retry_after="0") if f.kind == "throttle" else f for f in FAULTS.values()
    )
    # A failed read-ahead page is read again by the kernel (a second request with its own
    # retries): faults must be frequent for some reads to end in EIO.
    stack.proxy.set_plan(
        FaultPlan(probability=0.85, kinds=kinds, seed=seed, match=stack.proxy.plan.match)
    )
    names = list(stack.unread)
    outcomes: dict[str, bool] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []
    queue = iter(names)

    def worker() -> None:
        try:
            while True:
                with lock:
                    name = next(queue, None)
                if name is None:
                    return
                ok = expect_right_or_eio(stack, name, f"fault mix (seed {seed})")
                with lock:
                    outcomes[name] = ok
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[0]
    injected = stack.proxy.injected_kinds()
    stack.proxy.clear()
    print(
        f"seed {seed}: {sum(outcomes.values())} of {len(outcomes)} files right, the rest EIO; "
        f"faults injected: {sorted(injected)}"
    )
    assert len(outcomes) == len(names) and injected
    # Faults off: every file of the layer reads right (what was cached is right, the rest
    # is fetched now).
    for name in sorted(stack.layer.files):
        expect_right(stack, name, f"after the fault mix (seed {seed})")
    stack.unread.clear()


def test_daemon_keeps_serving(stack: Stack) -> None:
    # The same layer mounts again (a second image using it), and reads right.
    target = prepare_remote(stack.snap, stack.proxy.host, stack.image, stack.layer)
    assert stack.snap.stat(target).labels.get(L.REMOTE)
    # An image whose registry host does not resolve: declined (ordinary mounts), not an error.
    labels = {
        L.TARGET_REF: "sha256:" + "e" * 64,
        L.CRI_IMAGE_REF: "registry.sociable-chaos.invalid/chaos/none:v1",
        L.CRI_MANIFEST_DIGEST: "sha256:" + "d" * 64,
        L.CRI_LAYER_DIGEST: "sha256:" + "c" * 64,
    }
    mounts = stack.snap.prepare("extract-unresolvable", "", labels)
    assert mounts, "a declined layer gets ordinary mounts"
    stack.snap.remove("extract-unresolvable")
    # Ordinary snapshots on top of the lazy layer.
    stack.snap.prepare("chaos-active", target)
    stack.snap.commit("chaos-committed", "chaos-active")
    assert stack.snap.stat("chaos-committed").kind == "committed"
    with pytest.raises(grpc.RpcError) as err:
        stack.snap.stat("chaos-active")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for name in itertools.islice(sorted(stack.layer.files), 0, None, 7):
        expect_right(stack, name, "at the end")
    assert stack.daemon.alive(), stack.daemon.log_tail(40)


def test_stalled_body_times_out_and_is_retried(image: ChaosImage, stack: Stack) -> None:
    """A body that stalls past `request_timeout_sec` is a timeout: retried, then right."""
    layer = image.layers[0]
    blob = layer.path.read_bytes()
    size = 256 * 1024
    stalled = Fault("trickle", chunk_bytes=1024, interval_sec=0.2)

    async def fetch() -> tuple[bytes, int, float]:
        config = FetchConfig(max_attempts=2, backoff_initial_ms=1, request_timeout_sec=0.5)
        async with AsyncRegistryClient() as client:
            source = RegistrySource(
                client, Reference.parse(image.ref(stack.proxy.host)), config=config
            )
            started = trio.current_time()
            data = await source.fetch(Digest(layer.digest), 0, size)  # type: ignore[arg-type]
            return data, source.statistics().retries, trio.current_time() - started

    stack.proxy.set_plan(FaultPlan.first(1, stalled, match=stack.proxy.plan.match))
    data, retries, took = trio.run(fetch)
    stack.proxy.clear()
    assert data == blob[:size]
    assert retries == 1 and 0.5 <= took < 10.0, (retries, took)


def test_unresolvable_mirror_is_skipped_for_the_registry(
    image: ChaosImage, stack: Stack, tmp_path: Path
) -> None:
    """A hosts.toml mirror whose name does not resolve: each read falls through to the
    registry within the same attempt."""
    layer = image.layers[0]
    blob = layer.path.read_bytes()
    host_dir = tmp_path / "certs.d" / stack.proxy.host
    host_dir.mkdir(parents=True)
    (host_dir / "hosts.toml").write_text(
        f'server = "http://{stack.proxy.host}"\n\n'
        '[host."http://mirror.sociable-chaos.invalid:5000"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )

    async def fetch() -> tuple[bytes, int]:
        async with AsyncRegistryClient(hosts_dirs=[tmp_path / "certs.d"]) as client:
            endpoints = client.session.hosts(stack.proxy.host).endpoints("pull")
            assert endpoints[0].host == "mirror.sociable-chaos.invalid:5000"
            source = RegistrySource(client, Reference.parse(image.ref(stack.proxy.host)))
            data = await source.fetch(Digest(layer.digest), 1000, 70_000)  # type: ignore[arg-type]
            return data, source.statistics().retries

    before = stack.proxy.matched
    data, retries = trio.run(fetch)
    assert data == blob[1000:70_000]
    assert retries == 0 and stack.proxy.matched == before + 1
