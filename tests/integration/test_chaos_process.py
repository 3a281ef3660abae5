"""`kill -9` of the daemon with lazy layers and the span cache in play: never a wrong byte.

A real `sociable-snapshotter` mounts the two layers of an image of pseudo-random files
(converted into a real docker-registry, read through a `FaultProxy`) through the Snapshots
API and is killed with SIGKILL:

- during background fetch (the registry trickles, so the kill lands mid-request), at a seeded
  moment, three times over: after each restart every file of both layers reads right, the
  layers are still mounted (List/Stat), and a read through a layer's bind mount from before
  the kill is right or fails (never wrong bytes: whether such mounts survive a restart is not
  decided here);
- during a span cache write (a `sitecustomize` on the daemon's PYTHONPATH pauses the write of
  a cache file half-way, and the test kills the daemon there): after the restart no
  half-written file is left and every file reads right;
- during a seeded stream of Prepare (lazy layers, and ordinary snapshots on them), Commit,
  Remove and Cleanup calls, four rounds, some followed by a "reboot" (every mount under the
  root swept before the restart): after each restart every acknowledged call is
  durable and the interrupted one applied fully or not at all, each lazy snapshot has its
  layer mounted and readable, no other layer is mounted; at the end, everything removed and
  `Cleanup` called: no snapshot directory, restore record, FUSE layer, mount or temporary file
  is left, and every file of the span cache is a span of its layer;
- lazy snapshots removed (not yet cleaned up) before a reboot: `Cleanup` after the restart
  reclaims their restore records and marks the cached spans of a layer no record refers to
  any more released (evicted first), and only those.

Every randomised case prints its seed; `SOCIABLE_CHAOS_SEED=<seed>` replays it.
Test budget: about 60 s (the chaos suite together: under 120 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from snapshotter import mountinfo
from snapshotter.remote import labels as L
from tests.support.chaos import (
    ChaosImage,
    ChaosLayer,
    chaos_seed,
    fuse_dirs,
    prepare_remote,
    push_chaos_image,
    read_file,
    write_config,
)
from tests.support.faultproxy import Fault, FaultPlan, start_fault_proxy
from tests.support.registry import RegistryServer
from tests.support.snapclient import SnapClient, SnapDaemon, can_mount, sweep_mounts

pytestmark = [pytest.mark.root, pytest.mark.slow]

BACKGROUND = """
background_fetch = true
background_quiet_period_ms = 0
background_rate_bytes_per_sec = 0
background_step_bytes = 262144
readahead_spans = 0
fetch_backoff_initial_ms = 20
fetch_backoff_max_ms = 100
"""
TRICKLE = Fault("trickle", chunk_bytes=32 * 1024, interval_sec=0.02)
"""About 1.6 MB/s: a background step of 256 KiB takes ~0.15 s, a layer ~1.5 s."""


@pytest.fixture(scope="module")
def image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> ChaosImage:
    reason = can_mount()
    if reason:
        pytest.skip(f"PREREQUISITE MISSING: {reason}")
    return push_chaos_image(
        registry.host,
        registry.url,
        tmp_path_factory.mktemp("chaos-process-image"),
        "chaos/process",
        layers=2,
        files=12,
    )


@contextlib.contextmanager
def daemon_at(base: Path, config: str) -> Iterator[SnapDaemon]:
    """A daemon under `base` (not started); killed and its mounts swept on exit."""
    base.mkdir(parents=True, exist_ok=True)
    d = SnapDaemon(
        root=base / "root",
        address=base / "snap.sock",
        log=base / "daemon.log",
        config=write_config(base, config),
    )
    try:
        yield d
    finally:
        d.kill9()
        sweep_mounts(base)


def check_layer(root: Path, layer: ChaosLayer, what: str, names: list[str] | None = None) -> None:
    """`names` (default: all) of `layer`'s files read right through its FUSE directory."""
    dirs = fuse_dirs(root).get(layer.digest)
    assert dirs, f"{what}: layer {layer.digest} is not mounted"
    for name in names if names is not None else sorted(layer.files):
        got = read_file(dirs[0] / name)
        assert not isinstance(got, OSError), f"{what}: {name}: {got}"
        assert got == layer.files[name], f"{what}: {name}: WRONG BYTES"


def check_cache(root: Path, image: ChaosImage) -> None:
    """Every compressed span file is a span of its layer; no temporary file is left."""
    digests = {layer.digest: layer.span_digests() for layer in image.layers}
    spans = root / "cache" / "spans"
    for layer_dir in spans.iterdir() if spans.is_dir() else ():
        layer = "sha256:" + layer_dir.name.removeprefix("sha256-")
        for f in layer_dir.iterdir():
            if f.name.isdigit():
                got = "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
                assert got in digests[layer], f"{f}: not a span of {layer}"
    tmp = root / "cache" / "tmp"
    assert not tmp.is_dir() or not list(tmp.iterdir()), f"left in {tmp}: {list(tmp.iterdir())}"


def test_kill9_during_background_fetch(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    seed = chaos_seed("kill -9 during background fetch")
    rng = random.Random(seed)
    lower, upper = image.layers
    with (
        start_fault_proxy(registry.url, FaultPlan(match="/blobs/")) as proxy,
        daemon_at(tmp_path / "d", BACKGROUND) as daemon,
    ):
        daemon.start()
        with contextlib.closing(daemon.client()) as snap:
            # Mounted before the background fetch trickles (the image's blobs are fetched
            # whole while mounting), then the layers' Range reads trickle.
            first = prepare_remote(snap, proxy.host, image, lower)
            proxy.set_plan(FaultPlan.always(TRICKLE, match=f"/blobs/{lower.digest}"))
            second = prepare_remote(snap, proxy.host, image, upper, parent=first)
        old_fs = sorted((daemon.root / "snapshots").glob("*/fs"))
        # Every Range read trickles from here on: the background fetch of the restarted
        # daemons is under way at the next kill too.
        proxy.set_plan(FaultPlan.always(TRICKLE, match="/blobs/sha256:"))
        for round_no in range(3):
            before = proxy.matched
            if round_no == 0:  # the background fetch is under way (later it may be done)
                deadline = time.monotonic() + 30
                while not proxy.injected:
                    assert time.monotonic() < deadline, "the background fetch never started"
                    time.sleep(0.02)
            time.sleep(rng.uniform(0.2, 1.0))
            daemon.kill9()
            print(f"round {round_no}: killed after {proxy.matched - before} Range requests")
            daemon.start()
            with contextlib.closing(daemon.client()) as snap:
                infos = {i.name: i for i in snap.list()}
                assert infos[first].kind == "committed" and infos[first].labels.get(L.REMOTE)
                assert infos[second].parent == first and infos[second].labels.get(L.REMOTE)
            # A bind mount of a layer made before the kill: right bytes or an error.
            for fs in old_fs:
                for layer in image.layers:
                    name = sorted(layer.files)[0]
                    got = read_file(fs / name)
                    if not isinstance(got, OSError):
                        assert got == layer.files[name], f"{fs}/{name}: WRONG BYTES"
            if round_no < 2:  # a few files now; the rest is fetched by the background
                check_layer(daemon.root, lower, f"round {round_no}", sorted(lower.files)[:3])
        proxy.clear()
        check_layer(daemon.root, lower, "after three kills")
        check_layer(daemon.root, upper, "after three kills")
        check_cache(daemon.root, image)
        daemon.stop()


SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test hook: the span cache's first file write pauses half-way (the test kills the
    daemon there)."""
    import os

    _MARK = os.environ.get("SOCIABLE_TEST_PAUSE_CACHE_WRITE", "")
    if _MARK:
        import builtins
        import time
        from pathlib import Path

        from snapshotter.lazy import cache as _cache

        _open = builtins.open

        class _Paused:
            def __init__(self, f):
                self._f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def write(self, data):
                if not data:
                    return 0
                half = len(data) // 2
                n = self._f.write(data[:half])
                self._f.flush()
                with _open(_MARK, "a") as mark:
                    mark.write(self._f.name + "\\n")
                time.sleep(60)
                return n + self._f.write(data[half:])

        def _pausing_open(path, mode="r", *args, **kwargs):
            f = _open(path, mode, *args, **kwargs)
            if "w" in mode and Path(path).parent.name == "tmp":
                return _Paused(f)
            return f

        _cache.open = _pausing_open
    '''
)


def test_kill9_during_a_span_cache_write(
    registry: RegistryServer,
    image: ChaosImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lower = image.layers[0]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    mark = tmp_path / "paused"
    config = "background_fetch = false\nreadahead_spans = 0"
    with (
        start_fault_proxy(registry.url) as proxy,
        daemon_at(tmp_path / "d", config) as daemon,
    ):
        monkeypatch.setenv("PYTHONPATH", str(hooks))
        monkeypatch.setenv("SOCIABLE_TEST_PAUSE_CACHE_WRITE", str(mark))
        daemon.start()
        with contextlib.closing(daemon.client()) as snap:
            prepare_remote(snap, proxy.host, image, lower)
        name = sorted(lower.files)[0]
        outcome: list[bytes | OSError] = []
        reader = threading.Thread(
            target=lambda: outcome.append(
                read_file(fuse_dirs(daemon.root)[lower.digest][0] / name)
            ),
            daemon=True,
        )
        reader.start()
        deadline = time.monotonic() + 30
        while not mark.exists():
            assert time.monotonic() < deadline, f"no cache write paused\n{daemon.log_tail(30)}"
            time.sleep(0.02)
        torn = Path(mark.read_text().split()[0])
        assert torn.exists() and torn.stat().st_size > 0, torn
        daemon.kill9()
        monkeypatch.delenv("SOCIABLE_TEST_PAUSE_CACHE_WRITE")
        daemon.start()
        assert not torn.exists(), f"the half-written {torn} was left behind"
        # The read in flight at the kill: an error at once, or an answer from the new daemon
        # when the FUSE connection outlived the old one.
        reader.join(30)
        assert not reader.is_alive(), "a read in flight at the kill never ended"
        got = outcome[0]
        assert isinstance(got, OSError) or got == lower.files[name], f"{name}: WRONG BYTES"
        print(f"the read in flight at the kill: {got!r:.60}")
        check_layer(daemon.root, lower, "after a kill mid-write")
        check_cache(daemon.root, image)
        daemon.stop()


# -- a stream of calls with lazy layers ------------------------------------------------------


@dataclass
class Snap:
    kind: str
    parent: str
    digest: str = ""  # the layer of a lazy snapshot


@dataclass
class Model:
    live: dict[str, Snap] = field(default_factory=dict)
    in_flight: tuple[str, ...] | None = None
    calls: int = 0
    unexpected: list[str] = field(default_factory=list)

    def leaves(self) -> list[str]:
        parents = {s.parent for s in self.live.values()}
        return [k for k in self.live if k not in parents]


def _stream(
    snap: SnapClient,
    host: str,
    image: ChaosImage,
    model: Model,
    rng: random.Random,
    stop: threading.Event,
) -> None:
    lower, upper = image.layers
    while not stop.is_set():
        committed = [k for k, s in model.live.items() if s.kind == "committed"]
        lazy_lower = [k for k, s in model.live.items() if s.digest == lower.digest]
        actives = [k for k, s in model.live.items() if s.kind == "active"]
        r = rng.random()
        try:
            if r < 0.3:
                layer, parent = lower, ""
                if lazy_lower and rng.random() < 0.5:
                    layer, parent = upper, rng.choice(lazy_lower)
                target = f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"
                model.in_flight = ("remote", target, parent, layer.digest)
                labels = {
                    L.TARGET_REF: target,
                    L.CRI_IMAGE_REF: image.ref(host),
                    L.CRI_MANIFEST_DIGEST: image.manifest,
                    L.CRI_LAYER_DIGEST: layer.digest,
                }
                try:
                    snap.prepare(f"extract-{target}", parent, labels)
                    model.unexpected.append(f"{layer.digest} not mounted lazily")
                    snap.remove(f"extract-{target}")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    model.live[target] = Snap("committed", parent, layer.digest)
            elif r < 0.5 and committed:
                key = f"active-{uuid.uuid4().hex[:12]}"
                parent = rng.choice(committed)
                model.in_flight = ("prepare", key, parent)
                snap.prepare(key, parent)
                model.live[key] = Snap("active", parent)
            elif r < 0.7 and actives:
                key = rng.choice(actives)
                name = f"committed-{uuid.uuid4().hex[:12]}"
                model.in_flight = ("commit", name, key)
                snap.commit(name, key)
                model.live[name] = Snap("committed", model.live.pop(key).parent)
            elif r < 0.9 and model.leaves():
                key = rng.choice(model.leaves())
                model.in_flight = ("remove", key)
                snap.remove(key)
                del model.live[key]
            else:
                model.in_flight = ("cleanup",)
                snap.cleanup()
        except grpc.RpcError as e:
            crash = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            if not crash and not stop.wait(5):
                model.unexpected.append(f"{model.in_flight}: {e.code()} {e.details()}")
            return
        model.in_flight = None
        model.calls += 1


def _settle(model: Model, infos: dict[str, object], snap: SnapClient) -> None:
    """Applies the interrupted call to the model, checking it applied fully or not at all."""
    op, model.in_flight = model.in_flight, None
    if op is None or op[0] == "cleanup":
        return
    if op[0] == "remote":
        _, target, parent, digest = op
        if f"extract-{target}" in infos:  # the key containerd would remove and retry
            snap.remove(f"extract-{target}")
            del infos[f"extract-{target}"]
        if target in infos:
            model.live[target] = Snap("committed", parent, digest)
    elif op[0] == "prepare":
        _, key, parent = op
        if key in infos:
            model.live[key] = Snap("active", parent)
    elif op[0] == "commit":
        _, name, key = op
        assert (name in infos) != (key in infos), f"Commit({name}, {key}) half-applied"
        if name in infos:
            model.live[name] = Snap("committed", model.live.pop(key).parent)
    elif op[0] == "remove" and op[1] not in infos:
        del model.live[op[1]]


def _check_round(
    daemon: SnapDaemon, image: ChaosImage, model: Model, what: str, every: int = 4
) -> None:
    """The daemon after a restart against the model; every `every`-th file of each mounted
    layer read and compared."""
    with contextlib.closing(daemon.client()) as snap:
        infos: dict[str, object] = {i.name: i for i in snap.list()}
        _settle(model, infos, snap)
        assert set(infos) == set(model.live), (
            f"{what}: unexpected {sorted(set(infos) - set(model.live))}, "
            f"missing {sorted(set(model.live) - set(infos))}"
        )
        for name, s in model.live.items():
            info = snap.stat(name)
            assert (info.kind, info.parent) == (s.kind, s.parent), f"{what}: {name}: {info}"
            assert bool(info.labels.get(L.REMOTE)) == bool(s.digest), f"{what}: {name}: {info}"
        snap.cleanup()
        mounted = {d: len(v) for d, v in fuse_dirs(daemon.root).items()}
        wanted: dict[str, int] = {}
        for s in model.live.values():
            if s.digest:
                wanted[s.digest] = wanted.get(s.digest, 0) + 1
        assert mounted == wanted, f"{what}: FUSE layers {mounted}, lazy snapshots {wanted}"
        for layer in image.layers:
            if layer.digest in wanted:
                check_layer(daemon.root, layer, what, sorted(layer.files)[::every])


def test_kill9_during_calls_with_lazy_layers(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    seed = chaos_seed("kill -9 during calls with lazy layers")
    rng = random.Random(seed)
    model = Model()
    with (
        start_fault_proxy(registry.url) as proxy,
        daemon_at(tmp_path / "d", BACKGROUND) as daemon,
    ):
        for round_no in range(4):
            daemon.start()
            if round_no:
                _check_round(daemon, image, model, f"round {round_no} (seed {seed})")
            stop = threading.Event()
            with contextlib.closing(daemon.client()) as snap:
                worker = threading.Thread(
                    target=_stream, args=(snap, proxy.host, image, model, rng, stop), daemon=True
                )
                worker.start()
                time.sleep(rng.uniform(0.5, 2.0))
                daemon.kill9()
                stop.set()
                worker.join(60)
            assert not worker.is_alive(), "the client hung after the kill"
            reboot = rng.random() < 0.5
            if reboot:  # as after a reboot: no mount is left (nothing to adopt)
                sweep_mounts(tmp_path / "d")
            assert not model.unexpected, model.unexpected
            lazy = sum(1 for s in model.live.values() if s.digest)
            print(
                f"round {round_no}: {model.calls} calls, {len(model.live)} snapshots "
                f"({lazy} lazy), in flight at the kill: {model.in_flight}"
                + (", then a reboot" if reboot else "")
            )
        daemon.start()
        _check_round(daemon, image, model, f"last round (seed {seed})", every=1)
        assert model.calls >= 8, f"only {model.calls} calls in four rounds"

        # Everything removed and reclaimed.
        with contextlib.closing(daemon.client()) as snap:
            while model.live:
                for key in model.leaves():
                    snap.remove(key)
                    del model.live[key]
            snap.cleanup()
            assert snap.list() == []
        root = daemon.root
        assert not fuse_dirs(root), f"layers still mounted: {fuse_dirs(root)}"
        left = [p for p in (root / "snapshots").iterdir()] if (root / "snapshots").is_dir() else []
        assert not left, f"left after Cleanup: {left}"
        records = list((root / "remote").glob("*.json")) if (root / "remote").is_dir() else []
        assert not records, f"restore records left: {records}"
        mounts = [m.mountpoint for m in mountinfo.mounts_under(root.resolve())]
        want = sorted(str((root / name).resolve()) for name in ("fuse", "fuse-plain"))
        assert sorted(mounts) == want, f"mounts left: {mounts}"
        check_cache(root, image)
        daemon.stop()
        # What is left on disk after a clean stop: the caches, the local index store, the
        # databases (sqlite keeps its pages and write-ahead log) and a few small files; no
        # temporary file of a write the kills interrupted (the next start removed them).
        kept = {root / "cache", root / "content"}
        rest = {
            str(p.relative_to(root)): p.stat().st_size
            for p in root.rglob("*")
            if p.is_file() and not any(p.is_relative_to(k) for k in kept) and ".db" not in p.name
        }
        print(f"after Cleanup and a stop, outside the caches, index store and databases: {rest}")
        assert not [name for name in rest if Path(name).name.startswith(".tmp-")], rest
        assert sum(rest.values()) < 64 * 1024, rest


def test_snapshot_removed_before_a_reboot_leaves_no_record(
    registry: RegistryServer, image: ChaosImage, tmp_path: Path
) -> None:
    """Lazy snapshots removed (not yet cleaned up) when the node goes down: after the restart
    (every mount gone, as after a reboot) `Cleanup` reclaims their restore records too, and
    marks the cached spans of the layer no record refers to any more released; the spans of
    the layer a kept snapshot still serves stay as they were."""
    lower, upper = image.layers
    with (
        start_fault_proxy(registry.url) as proxy,
        daemon_at(tmp_path / "d", "background_fetch = false") as daemon,
    ):
        daemon.start()
        with contextlib.closing(daemon.client()) as snap:
            kept = prepare_remote(snap, proxy.host, image, lower)
            gone = prepare_remote(snap, proxy.host, image, lower)
            gone_upper = prepare_remote(snap, proxy.host, image, upper, parent=kept)
            check_layer(daemon.root, lower, "before the reboot", sorted(lower.files)[:2])
            check_layer(daemon.root, upper, "before the reboot", sorted(upper.files)[:2])
            snap.remove(gone)
            snap.remove(gone_upper)
        records = daemon.root / "remote"
        assert len(list(records.glob("*.json"))) == 3
        spans = daemon.root / "cache" / "spans"
        cached = {
            layer.digest: spans / f"sha256-{layer.digest.removeprefix('sha256:')}"
            for layer in image.layers
        }
        for layer, d in cached.items():
            assert any(f.name.isdigit() for f in d.iterdir()), f"nothing of {layer} cached"
        daemon.kill9()
        sweep_mounts(tmp_path / "d")  # a reboot: no mount is left
        daemon.start()
        with contextlib.closing(daemon.client()) as snap:
            assert [i.name for i in snap.list()] == [kept]
            assert not (cached[upper.digest] / ".released").exists()
            snap.cleanup()
        # The removed upper layer's spans are evicted first from now on (not deleted yet);
        # the lower layer's are not: the kept snapshot still serves them.
        released = sorted(f.name for f in cached[upper.digest].iterdir())
        assert ".released" in released and any(n.isdigit() for n in released), released
        assert not (cached[lower.digest] / ".released").exists()
        check_layer(daemon.root, lower, "after the reboot", sorted(lower.files)[:2])
        left = sorted(p.name for p in records.glob("*.json"))
        assert left == [d.name + ".json" for d in fuse_dirs(daemon.root)[lower.digest]], (
            f"restore records {left} for FUSE layers {fuse_dirs(daemon.root)}"
        )
        daemon.stop()
