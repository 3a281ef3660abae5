"""containerd's snapshotter test suite (1.6.20 `snapshots/testsuite`), re-done against
the real daemon over its gRPC socket, with the returned mounts performed for real.

Every case of that suite has a test here (Rename is skipped upstream
in 1.6.20 too). Layer checks follow `checkSnapshots`: Prepare on the previous
committed snapshot, mount, apply changes, unmount, Commit, then View the commit and
compare its mounted tree with a flat directory the same changes were applied to.
Each test gets a fresh daemon (own root and socket), umask 0 as upstream.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from tests.support.snapclient import (
    SnapClient,
    SnapDaemon,
    can_mount,
    mounted,
    run_daemon,
)

pytestmark = pytest.mark.root

GC_ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}

Applier = Callable[[Path], None]


@pytest.fixture(autouse=True)
def _prerequisites_and_umask() -> Iterator[None]:
    reason = can_mount()
    if reason is not None:
        pytest.skip(f"SKIPPED LOUDLY: snapshotter conformance needs real mounts: {reason}")
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def snapd(tmp_path: Path) -> Iterator[SnapDaemon]:
    with run_daemon(tmp_path / "snapd") as d:
        yield d


@pytest.fixture
def snap(snapd: SnapDaemon) -> Iterator[SnapClient]:
    c = snapd.client()
    try:
        yield c
    finally:
        c.close()


# ------------------------------------------------------------------ fs appliers


def create_file(name: str, content: bytes, mode: int = 0o644) -> Applier:
    def apply(root: Path) -> None:
        p = root / name
        with open(p, "wb") as f:
            f.write(content)
        os.chmod(p, mode)

    return apply


def create_dir(name: str, mode: int = 0o755) -> Applier:
    def apply(root: Path) -> None:
        (root / name).mkdir()
        os.chmod(root / name, mode)

    return apply


def remove_all(name: str) -> Applier:
    def apply(root: Path) -> None:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            for sub in sorted(p.rglob("*"), key=lambda x: len(x.parts), reverse=True):
                if sub.is_dir() and not sub.is_symlink():
                    sub.rmdir()
                else:
                    sub.unlink()
            p.rmdir()
        elif p.exists() or p.is_symlink():
            p.unlink()

    return apply


def chown(name: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(root / name, uid, gid)

    return apply


def chmod(name: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        os.chmod(root / name, mode)

    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(root / old, root / new)

    return apply


def symlink(target: str, name: str) -> Applier:
    def apply(root: Path) -> None:
        os.symlink(target, root / name)

    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Path -> (type, mode, uid, gid, content/target) for every entry under root."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                extra: object = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = p.read_bytes()
            else:
                extra = None
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                extra,
            )
    return out


def assert_same_tree(actual: Path, expected: Path) -> None:
    a, e = tree(actual), tree(expected)
    assert sorted(a) == sorted(e), (
        f"entries differ: only in view {sorted(set(a) - set(e))}, only in reference {sorted(set(e) - set(a))}"
    )
    for k in e:
        assert a[k] == e[k], f"{k}: view {a[k]!r} != reference {e[k]!r}"


# ------------------------------------------------------------------ helpers


def name(prefix: str = "s") -> str:
    # Opaque keys like containerd's translated backend keys: '/', ' ' and ':'.
    return f"testsuite/{uuid.uuid4().hex[:8]}/{prefix} sha256:{uuid.uuid4().hex[:12]}"


def check_snapshots(
    client: SnapClient, work: Path, appliers: Sequence[Applier], *, check_before: bool = True
) -> str:
    """Apply each layer through the snapshotter and compare every commit with a flat dir.

    Returns the name of the last committed snapshot.
    """
    flat = work / "flat"
    flat.mkdir()
    os.chmod(flat, 0o755)
    target = work / "mnt"
    parent = ""
    for i, applier in enumerate(appliers):
        key = name(f"active-{i}")
        mounts = client.prepare(key, parent, GC_ROOT)
        with mounted(mounts, target):
            if check_before:
                assert_same_tree(target, flat)
            applier(target)
        applier(flat)
        committed = name(f"committed-{i}")
        client.commit(committed, key, GC_ROOT)
        view = name(f"view-{i}")
        with mounted(client.view(view, committed, GC_ROOT), target):
            assert_same_tree(target, flat)
        client.remove(view)
        parent = committed
    return parent


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    err = ei.value
    assert isinstance(err, grpc.Call)
    assert err.details(), "error without a readable message"
    return err.code()  # type: ignore[no-any-return]


def fs_dir_of(mounts: Sequence[object], kind: str = "active") -> Path:
    """The snapshot's own fs dir from its mounts (bind source or upperdir)."""
    m = mounts[0]
    if m.type == "bind":  # type: ignore[attr-defined]
        return Path(m.source)  # type: ignore[attr-defined]
    for o in m.options:  # type: ignore[attr-defined]
        if o.startswith("upperdir="):
            return Path(o[len("upperdir=") :])
    raise AssertionError(f"no own dir in {mounts!r}")


# ------------------------------------------------------------------ cases


def test_basic(snap: SnapClient, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    preparing = name("preparing")
    mounts = snap.prepare(preparing, "", GC_ROOT)
    assert [m.type for m in mounts] == ["bind"] and mounts[0].options == ("rw", "rbind")
    with mounted(mounts, target):
        (target / "foo").write_bytes(b"foo\n")
        (target / "a" / "b").mkdir(parents=True)
        (target / "a" / "b" / "c").write_bytes(b"content\n")
        (target / "bar").write_bytes(b"bar\n")
    committed = name("committed")
    snap.commit(committed, preparing, GC_ROOT)
    si = snap.stat(committed)
    assert (si.name, si.parent, si.kind) == (committed, "", "committed")
    assert code_of(lambda: snap.stat(preparing)) == grpc.StatusCode.NOT_FOUND

    next_key = name("nextlayer")
    mounts = snap.prepare(next_key, committed, GC_ROOT)
    assert mounts[0].type == "overlay"
    with mounted(mounts, target):
        assert (target / "foo").read_bytes() == b"foo\n"
        assert (target / "a" / "b" / "c").read_bytes() == b"content\n"
        (target / "bar").write_bytes(b"bar changed\n")
        (target / "baz").write_bytes(b"baz\n")
        remove_all("a")(target)
    ni = snap.stat(next_key)
    assert (ni.name, ni.parent, ni.kind) == (next_key, committed, "active")
    next_commit = name("nextcommit")
    snap.commit(next_commit, next_key, GC_ROOT)

    walked = {i.name: i for i in snap.list()}
    assert set(walked) == {committed, next_commit}
    assert walked[committed] == snap.stat(committed)
    assert walked[next_commit] == snap.stat(next_commit)

    view = name("view")
    with mounted(snap.view(view, next_commit, GC_ROOT), tmp_path / "view"):
        v = tmp_path / "view"
        assert sorted(p.name for p in v.iterdir()) == ["bar", "baz", "foo"]
        assert (v / "bar").read_bytes() == b"bar changed\n"
    snap.remove(view)
    with pytest.raises(grpc.RpcError) as ei:
        snap.remove(committed)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "remove" in ei.value.details()  # type: ignore[attr-defined]
    snap.remove(next_commit)
    snap.remove(committed)
    assert snap.list() == []


def test_stat_active(snap: SnapClient) -> None:
    key = name("active")
    snap.prepare(key, "", GC_ROOT)
    si = snap.stat(key)
    assert (si.name, si.kind, si.parent) == (key, "active", "")
    assert si.labels == GC_ROOT


def test_stat_committed(snap: SnapClient) -> None:
    key, committed = name("active"), name("committed")
    snap.prepare(key, "", GC_ROOT)
    snap.commit(committed, key, GC_ROOT)
    si = snap.stat(committed)
    assert (si.name, si.kind, si.parent) == (committed, "committed", "")


def test_transitivity(snap: SnapClient) -> None:
    a, b = name("a"), name("b")
    snap.prepare(a + "-key", "", GC_ROOT)
    snap.commit(a, a + "-key", GC_ROOT)
    snap.prepare(b + "-key", a, GC_ROOT)
    snap.commit(b, b + "-key", GC_ROOT)
    assert snap.stat(b).parent == a
    assert snap.stat(a).parent == ""


def test_prepare_view_failing(snap: SnapClient) -> None:
    base_key, base = name("base-key"), name("base")
    snap.prepare(base_key, "", GC_ROOT)
    snap.commit(base, base_key, GC_ROOT)
    k = name("k")
    snap.prepare(k, base, GC_ROOT)
    assert code_of(lambda: snap.view(k, base, GC_ROOT)) == grpc.StatusCode.ALREADY_EXISTS
    k2 = name("k2")
    snap.prepare(k2, base, GC_ROOT)
    assert code_of(lambda: snap.prepare(k2, base, GC_ROOT)) == grpc.StatusCode.ALREADY_EXISTS
    k3 = name("k3")
    snap.view(k3, base, GC_ROOT)
    assert code_of(lambda: snap.view(k3, base, GC_ROOT)) == grpc.StatusCode.ALREADY_EXISTS


def test_update(snap: SnapClient) -> None:
    t0 = time.time_ns()
    c1, c2 = name("c1"), name("c2")
    snap.prepare(c1 + "-a", "", GC_ROOT)
    snap.commit(c1, c1 + "-a", GC_ROOT)
    snap.prepare(c2 + "-a", c1, GC_ROOT)
    snap.commit(c2, c2 + "-a", GC_ROOT)
    a1, a2, v1, v2 = name("a1"), name("a2"), name("v1"), name("v2")
    snap.prepare(a1, "", GC_ROOT)
    snap.prepare(a2, c2, GC_ROOT)
    snap.view(v1, "", GC_ROOT)
    snap.view(v2, c2, GC_ROOT)
    t1 = time.time_ns()
    expected = {
        c1: ("committed", ""),
        c2: ("committed", c1),
        a1: ("active", ""),
        a2: ("active", c2),
        v1: ("view", ""),
        v2: ("view", c2),
    }
    for key, (kind, parent) in expected.items():
        si = snap.stat(key)
        assert (si.name, si.kind, si.parent) == (key, kind, parent)
        assert t0 <= si.created_ns <= t1
        assert si.created_ns == si.updated_ns

        new_labels = {"l1": "v1", "l2": "v2", "l3": "v3"}
        time.sleep(0.001)
        after = snap.update(key, new_labels, (), parent="wrong-parent-ignored")
        assert after.labels == new_labels
        assert after.parent == parent and after.kind == kind
        assert after.created_ns == si.created_ns
        assert after.updated_ns > si.updated_ns
        assert snap.stat(key) == after

        time.sleep(0.001)
        after2 = snap.update(
            key, {"l1": "updated", "l3": "v3", "l4": "v4"}, ("labels.l1", "labels.l2")
        )
        assert after2.labels == {"l1": "updated", "l3": "v3"}
        assert after2.updated_ns > after.updated_ns

        after3 = snap.update(key, {"l4": "v4", "l5": "v5"}, ("labels",))
        assert after3.labels == {"l4": "v4", "l5": "v5"}

        assert code_of(lambda k=key: snap.update(k, {}, ("parent",), parent="x")) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert snap.stat(key).labels == {"l4": "v4", "l5": "v5"}


def test_remove(snap: SnapClient) -> None:
    key = name("key")
    snap.prepare(key, "", GC_ROOT)
    snap.remove(key)
    snap.view(key, "", GC_ROOT)
    snap.remove(key)
    snap.prepare(key, "", GC_ROOT)
    committed1 = name("committed-1")
    snap.commit(committed1, key, GC_ROOT)
    child = name("child")
    snap.prepare(child, committed1, GC_ROOT)
    assert code_of(lambda: snap.remove(committed1)) == grpc.StatusCode.FAILED_PRECONDITION
    snap.remove(child)
    snap.remove(committed1)
    assert code_of(lambda: snap.stat(committed1)) == grpc.StatusCode.NOT_FOUND
    key2 = name("key2")
    snap.prepare(key2, "", GC_ROOT)
    snap.commit(committed1, key2, GC_ROOT)  # the removed name is reusable at once
    assert snap.stat(committed1).kind == "committed"


def test_walk(snap: SnapClient) -> None:
    wl = {"l": "1"}
    wl2 = {"l": "2"}
    snap.prepare("p-key", "", {})
    snap.commit("p", "p-key", {})
    snap.prepare("p-wl-key", "", {})
    snap.commit("p-wl", "p-wl-key", wl)
    snap.prepare("a-np", "", {})
    snap.prepare("a-np-wl", "", wl)
    snap.prepare("a", "p", {})
    snap.prepare("a-wl", "p", wl2)
    snap.view("v", "p", {})
    snap.view("v-wl", "p", wl2)
    everything = {"p", "p-wl", "a-np", "a-np-wl", "a", "a-wl", "v", "v-wl"}

    def names(*filters: str) -> set[str]:
        infos = snap.list(filters)
        for i in infos:
            assert i == snap.stat(i.name)
        return {i.name for i in infos}

    assert names() == everything
    assert names("labels.l==1") == {"p-wl", "a-np-wl"}
    assert names('labels."l"==2') == {"a-wl", "v-wl"}
    assert names("kind==active,labels.l") == {"a-np-wl", "a-wl"}
    assert names("kind==view,labels.l==2") == {"v-wl"}
    assert names("kind==committed") == {"p", "p-wl"}
    assert names("name==p", "name==a-np-wl") == {"p", "a-np-wl"}
    assert names("name==a-wl,labels.l") == {"a-wl"}
    assert names("parent==p") == {"a", "a-wl", "v", "v-wl"}
    assert names('parent!=""') == {"a", "a-wl", "v", "v-wl"}
    assert names("labels.l") == {"p-wl", "a-np-wl", "a-wl", "v-wl"}
    assert names("labels.l==2") == {"a-wl", "v-wl"}
    assert names("name~=^a-np") == {"a-np", "a-np-wl"}
    assert names("name~=/-wl$/,kind!=committed") == {"a-np-wl", "a-wl", "v-wl"}


def test_layer_file_update(snap: SnapClient, tmp_path: Path) -> None:
    # Upstream runs 5 times across second boundaries to catch mtime-only checks.
    for run in range(5):
        work = tmp_path / f"run{run}"
        work.mkdir()
        check_snapshots(
            snap,
            work,
            [
                apply_all(create_file("/foo".lstrip("/"), b"foo\n", 0o777)),
                apply_all(create_file("foo", b"foo\nbar\n", 0o777)),
                apply_all(chmod("foo", 0o755)),
                apply_all(create_file("foo", b"bar\n", 0o700)),
            ],
        )
        if run < 4:
            time.sleep(0.3)


def test_remove_directory_in_lower_layer(snap: SnapClient, tmp_path: Path) -> None:
    check_snapshots(
        snap,
        tmp_path,
        [
            apply_all(
                create_dir("lib", 0o700),
                create_file("lib/hidden", b"hidden\n"),
                create_dir("lib/keep", 0o755),
            ),
            apply_all(
                remove_all("lib"), create_dir("lib", 0o755), create_file("lib/not-hidden", b"x\n")
            ),
            apply_all(create_file("lib/newfile", b"new\n")),
        ],
    )


def test_chown(snap: SnapClient, tmp_path: Path) -> None:
    check_snapshots(
        snap,
        tmp_path,
        [
            apply_all(
                create_dir("opt", 0o711),
                create_dir("opt/a", 0o711),
                create_dir("opt/a/b", 0o711),
                create_file("opt/a/b/file.txt", b"hello", 0o644),
            ),
            apply_all(
                chown("opt", 100, 100),
                chown("opt/a", 100, 100),
                chown("opt/a/b", 100, 100),
                chown("opt/a/b/file.txt", 100, 100),
            ),
        ],
    )


def test_directory_permission_on_commit(snap: SnapClient, tmp_path: Path) -> None:
    check_snapshots(
        snap,
        tmp_path,
        [
            apply_all(
                create_dir("dir1", 0o700),
                create_dir("dir2", 0o700),
                create_dir("dir3", 0o700),
                chown("dir1", 1, 1),
                create_file("dir1/file1", b"x", 0o644),
                chown("dir1/file1", 1, 1),
            ),
            apply_all(
                create_dir("dir1/sub", 0o700),
                chown("dir1/sub", 2, 2),
                remove_all("dir2"),
                create_dir("dir2", 0o711),
                chown("dir2", 3, 3),
                chown("dir3", 4, 4),
            ),
            apply_all(
                create_file("dir1/sub/f", b"y", 0o600),
                chown("dir1/sub/f", 5, 5),
                create_file("dir2/g", b"z", 0o640),
            ),
        ],
    )


def test_remove_intermediate_snapshot(snap: SnapClient, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    base = name("base")
    with mounted(snap.prepare(base, "", GC_ROOT), target):
        (target / "file").write_bytes(b"base")
    committed_base = name("committed-base")
    snap.commit(committed_base, base, GC_ROOT)
    intermediate = name("intermediate")
    with mounted(snap.prepare(intermediate, committed_base, GC_ROOT), target):
        (target / "file2").write_bytes(b"mid")
    committed_mid = name("committed-mid")
    snap.commit(committed_mid, intermediate, GC_ROOT)
    top = name("top")
    snap.prepare(top, committed_mid, GC_ROOT)
    assert code_of(lambda: snap.remove(committed_mid)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: snap.remove(committed_base)) == grpc.StatusCode.FAILED_PRECONDITION
    snap.remove(top)
    snap.remove(committed_mid)
    snap.remove(committed_base)
    assert snap.list() == []


def test_deleted_files_in_child_snapshot(snap: SnapClient, tmp_path: Path) -> None:
    check_snapshots(
        snap,
        tmp_path,
        [
            apply_all(create_file("foo", b"foo\n"), create_file("bar", b"bar\n")),
            apply_all(remove_all("foo")),
            apply_all(create_file("baz", b"baz\n")),
        ],
    )


def test_move_file_from_lower_layer(snap: SnapClient, tmp_path: Path) -> None:
    check_snapshots(
        snap,
        tmp_path,
        [
            apply_all(
                create_dir("dir", 0o755),
                create_file("dir/a", b"hello\n"),
                create_file("dir/b", b"b\n"),
            ),
            apply_all(
                create_dir("dir2", 0o755),
                link("dir/a", "dir2/a"),
                remove_all("dir"),
            ),
            apply_all(create_file("dir2/c", b"c\n")),
        ],
    )


def test_view_readonly(snap: SnapClient, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    base = name("base")
    with mounted(snap.prepare(base, "", GC_ROOT), target):
        (target / "foo").write_bytes(b"foo")
    committed = name("committed")
    snap.commit(committed, base, GC_ROOT)
    view = name("view")
    mounts = snap.view(view, committed, GC_ROOT)
    assert mounts[0].type == "bind" and "ro" in mounts[0].options
    with mounted(mounts, target):
        with pytest.raises(OSError) as ei:
            (target / "newfile").write_bytes(b"nope")
        assert ei.value.errno == 30  # EROFS
        assert (target / "foo").read_bytes() == b"foo"
    # A two-parent view is a read-only overlay.
    k2 = name("k2")
    snap.prepare(k2, committed, GC_ROOT)
    c2 = name("c2")
    snap.commit(c2, k2, GC_ROOT)
    view2 = name("view2")
    mounts = snap.view(view2, c2, GC_ROOT)
    assert mounts[0].type == "overlay"
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in mounts[0].options)
    with mounted(mounts, target):
        with pytest.raises(OSError) as ei:
            (target / "newfile").write_bytes(b"nope")
        assert ei.value.errno == 30


def test_stat_in_walk(snap: SnapClient) -> None:
    for i in range(250):  # more than two List batches
        snap.prepare(f"k{i:03d}", "", {"n": str(i)})
    assert snap.list_batches() == [100, 100, 50]
    seen = 0
    stream = snap.stub.List(
        __import__("snapshotter.api.snapshots_pb2", fromlist=["x"]).ListSnapshotsRequest()
    )
    for resp in stream:
        for pbi in resp.info:
            si = snap.stat(pbi.name)  # Stat while the List stream is still open
            assert si.labels == dict(pbi.labels)
            assert si.created_ns == pbi.created_at.seconds * 1_000_000_000 + pbi.created_at.nanos
            seen += 1
    assert seen == 250


def test_close_twice(tmp_path: Path) -> None:
    """Close (here: a clean daemon shutdown) twice: both succeed, state survives."""
    base = tmp_path / "d"
    with run_daemon(base) as d:
        c = d.client()
        c.prepare("k", "", GC_ROOT)
        c.commit("c", "k", GC_ROOT)
        c.close()
        assert d.stop() == 0
        assert d.stop() == 0
        d.start()
        c = d.client()
        assert c.stat("c").kind == "committed"
        c.close()


def test_root_permission(snap: SnapClient, tmp_path: Path) -> None:
    mounts = snap.prepare(name("root-perm"), "", GC_ROOT)
    with mounted(mounts, tmp_path / "mnt") as target:
        assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.slow
def test_128_layers_mount(snap: SnapClient, tmp_path: Path) -> None:
    def layer(i: int) -> Applier:
        def apply(root: Path) -> None:
            if i > 0:
                (root / f"f{i - 1}").unlink()
            (root / f"f{i}").write_bytes(f"layer {i}\n".encode())
            (root / "bottom").write_bytes(f"overwritten by {i}\n".encode())

        return apply

    top = check_snapshots(snap, tmp_path, [layer(i) for i in range(128)], check_before=True)
    view = name("top-view")
    mounts = snap.view(view, top, GC_ROOT)
    lower = next(o for o in mounts[0].options if o.startswith("lowerdir="))
    assert lower.count(":") == 127
    with mounted(mounts, tmp_path / "final") as target:
        assert_same_tree(target, tmp_path / "flat")


# ------------------------------------------------------------------ beyond the suite


def test_mount_specs_match_containerd_overlay(snap: SnapClient, snapd: SnapDaemon) -> None:
    root = snapd.root / "snapshots"
    index_off = Path("/sys/module/overlay/parameters/index").exists()
    m = snap.prepare("base", "", {})
    assert [(x.type, x.options) for x in m] == [("bind", ("rw", "rbind"))]
    base_fs = Path(m[0].source)
    assert base_fs.parent.parent == root and base_fs.name == "fs"
    assert stat.S_IMODE(base_fs.stat().st_mode) == 0o755
    assert stat.S_IMODE((base_fs.parent / "work").stat().st_mode) == 0o711
    os.chown(base_fs, 1234, 5678)
    snap.commit("c1", "base", {})
    snap.prepare("k2", "c1", {})
    snap.commit("c2", "k2", {})
    m = snap.prepare("top", "c2", {})
    opts = list(m[0].options)
    head = ["index=off"] if index_off else []
    assert opts[: len(head)] == head
    rest = opts[len(head) :]
    assert [o.split("=")[0] for o in rest] == ["workdir", "upperdir", "lowerdir"]
    lowers = rest[2][len("lowerdir=") :].split(":")
    assert lowers[-1] == str(base_fs)  # nearest parent first, base last
    upper = Path(rest[1][len("upperdir=") :])
    st = upper.stat()
    assert (st.st_uid, st.st_gid) == (os.stat(lowers[0]).st_uid, os.stat(lowers[0]).st_gid)
    # A view with one parent binds the parent's fs read-only.
    v = snap.view("v1", "c1", {})
    assert [(x.type, x.source, x.options) for x in v] == [("bind", str(base_fs), ("ro", "rbind"))]
    assert snap.mounts("top") == m
    assert snap.mounts("v1") == v


def test_usage_active_and_committed(snap: SnapClient, tmp_path: Path) -> None:
    m = snap.prepare("u", "", {})
    size0, inodes0 = snap.usage("u")
    assert inodes0 == 1 and size0 == os.lstat(m[0].source).st_blocks * 512  # the empty upper dir
    with mounted(m, tmp_path / "mnt") as target:
        (target / "big").write_bytes(os.urandom(1 << 20))
        (target / "d").mkdir()
        os.link(target / "big", target / "d" / "hardlink")
    size1, inodes1 = snap.usage("u")
    assert inodes1 == inodes0 + 2  # file (counted once despite the hard link) + dir
    assert size1 - size0 >= 1 << 20
    snap.commit("uc", "u", {})
    assert snap.usage("uc") == (size1, inodes1)


def test_cleanup_reclaims_removed_and_orphan_dirs(snap: SnapClient, snapd: SnapDaemon) -> None:
    snapshots = snapd.root / "snapshots"
    snap.prepare("keep", "", {})
    m = snap.prepare("gone", "", {})
    gone_dir = Path(m[0].source).parent
    snap.remove("gone")
    assert gone_dir.exists()  # removal is asynchronous
    (snapshots / "99999").mkdir()  # an orphan, as a crash would leave
    (snapshots / "new-leftover").mkdir()
    snap.cleanup()
    assert sorted(os.listdir(snapshots)) == [Path(snap.mounts("keep")[0].source).parent.name]
    snap.prepare("after", "", {})
    assert snap.stat("after").kind == "active"


def test_restart_serves_same_snapshots(tmp_path: Path) -> None:
    with run_daemon(tmp_path / "d") as d:
        c = d.client()
        c.prepare("k", "", {"a": "1"})
        c.commit("c", "k", {"b": "2"})
        c.prepare("child", "c", {})
        before = {i.name: i for i in c.list()}
        mounts_before = c.mounts("child")
        c.close()
        d.stop()
        d.start()
        c = d.client()
        assert {i.name: i for i in c.list()} == before
        assert c.mounts("child") == mounts_before
        c.close()


# ------------------------------------------------------------------ bad input


def test_bad_input_gets_documented_codes_and_daemon_keeps_serving(
    snap: SnapClient, snapd: SnapDaemon
) -> None:
    NF = grpc.StatusCode.NOT_FOUND
    AE = grpc.StatusCode.ALREADY_EXISTS
    FP = grpc.StatusCode.FAILED_PRECONDITION
    IA = grpc.StatusCode.INVALID_ARGUMENT
    snap.prepare("active", "", {})
    snap.view("view", "", {})
    snap.prepare("tmp", "", {})
    snap.commit("committed", "tmp", {})

    cases: list[tuple[str, Callable[[], object], grpc.StatusCode]] = [
        ("stat unknown", lambda: snap.stat("nope"), NF),
        ("mounts unknown", lambda: snap.mounts("nope"), NF),
        ("usage unknown", lambda: snap.usage("nope"), NF),
        ("remove unknown", lambda: snap.remove("nope"), NF),
        ("commit unknown", lambda: snap.commit("x", "nope"), NF),
        ("update unknown", lambda: snap.update("nope", {"a": "b"}), NF),
        ("prepare missing parent", lambda: snap.prepare("p1", "nope"), NF),
        ("view missing parent", lambda: snap.view("p2", "nope"), NF),
        ("prepare on active parent", lambda: snap.prepare("p3", "active"), IA),
        ("view on view parent", lambda: snap.view("p4", "view"), IA),
        ("prepare existing key", lambda: snap.prepare("committed"), AE),
        ("commit to existing name", lambda: snap.commit("view", "active"), AE),
        ("commit a view", lambda: snap.commit("x", "view"), FP),
        ("commit a committed", lambda: snap.commit("x", "committed"), FP),
        ("mounts of committed", lambda: snap.mounts("committed"), FP),
        (
            "remove with child",
            lambda: (snap.prepare("ch", "committed"), snap.remove("committed")),
            FP,
        ),
        ("update immutable kind", lambda: snap.update("active", {}, ("kind",)), IA),
        ("update immutable name", lambda: snap.update("active", {}, ("name",)), IA),
        ("empty key", lambda: snap.prepare(""), IA),
        ("oversized label", lambda: snap.prepare("big", "", {"k": "v" * 5000}), IA),
        ("filter missing value", lambda: snap.list(["kind=="]), IA),
        ("filter bad operator", lambda: snap.list(["kind=>active"]), IA),
        ("filter unterminated quote", lambda: snap.list(['labels."abc==1']), IA),
        ("filter bad regexp", lambda: snap.list(["name~=("]), IA),
        ("filter trailing dot", lambda: snap.list(["labels."]), IA),
        ("filter slash quote without ~=", lambda: snap.list(["name==/x/"]), IA),
    ]
    for what, call, want in cases:
        with pytest.raises(grpc.RpcError) as ei:
            call()
        err = ei.value
        assert err.code() == want, f"{what}: got {err.code()} {err.details()!r}"  # type: ignore[attr-defined]
        details = err.details()  # type: ignore[attr-defined]
        assert details and "internal error" not in details, f"{what}: {details!r}"
    # Messages name the object.
    with pytest.raises(grpc.RpcError) as ei:
        snap.stat("no such key")
    assert '"no such key"' in ei.value.details()  # type: ignore[attr-defined]
    # Nothing half-done, and the daemon still serves.
    assert snapd.alive()
    assert {i.name for i in snap.list()} == {"active", "view", "committed", "ch"}
    assert snap.stat("active").kind == "active"
