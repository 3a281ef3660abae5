"""One conformance suite for every MetaStore implementation (memory, sqlite)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.snapshots.metadata import MemoryStore, MetaStore, SqliteStore, apply_label_update
from snapshotter.snapshots.model import Kind, Snapshot, SnapshotId, Usage

StoreFactory = Callable[[], MetaStore]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetaStore]:
    s: MetaStore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "m.db")
    try:
        yield s
    finally:
        s.close()


def committed(store: MetaStore, name: str, parent: str = "", now: int = 1) -> Snapshot:
    snap = store.create(name + "-active", parent, Kind.ACTIVE, {}, now)
    store.commit(name, name + "-active", {}, Usage(), now)
    return snap


def test_create_and_get(store: MetaStore) -> None:
    snap = store.create("a", "", Kind.ACTIVE, {"x": "1"}, 100)
    assert snap.kind is Kind.ACTIVE and snap.parent_ids == ()
    info = store.get_info("a")
    assert (info.name, info.parent, info.kind) == ("a", "", Kind.ACTIVE)
    assert info.created_ns == info.updated_ns == 100
    assert dict(info.labels) == {"x": "1"}
    assert store.get_snapshot("a").id == snap.id


def test_parent_chain_nearest_first(store: MetaStore) -> None:
    a = committed(store, "a")
    b = committed(store, "b", "a")
    c = committed(store, "c", "b")
    top = store.create("top", "c", Kind.ACTIVE, {}, 5)
    assert top.parent_ids == (c.id, b.id, a.id)
    assert store.get_snapshot("top").parent_ids == (c.id, b.id, a.id)
    assert store.get_info("top").parent == "c"


def test_create_errors(store: MetaStore) -> None:
    store.create("a", "", Kind.ACTIVE, {}, 1)
    with pytest.raises(AlreadyExists, match='"a"'):
        store.create("a", "", Kind.VIEW, {}, 1)
    with pytest.raises(NotFound, match='"missing"'):
        store.create("b", "missing", Kind.ACTIVE, {}, 1)
    with pytest.raises(InvalidArgument, match="not committed"):
        store.create("b", "a", Kind.ACTIVE, {}, 1)
    with pytest.raises(InvalidArgument):
        store.create("b", "", Kind.COMMITTED, {}, 1)
    assert [i.name for i in store.list_infos()] == ["a"]


def test_commit_semantics(store: MetaStore) -> None:
    snap = store.create("k", "", Kind.ACTIVE, {"old": "1"}, 10)
    info = store.commit("n", "k", {"new": "2"}, Usage(4096, 3), 20)
    assert (info.name, info.kind, info.created_ns, info.updated_ns) == ("n", Kind.COMMITTED, 20, 20)
    assert dict(info.labels) == {"new": "2"}  # replaced, not merged
    with pytest.raises(NotFound):
        store.get_info("k")
    got = store.get_snapshot("n")
    assert got.id == snap.id and got.usage == Usage(4096, 3)


def test_commit_errors(store: MetaStore) -> None:
    store.create("k", "", Kind.ACTIVE, {}, 1)
    store.create("v", "", Kind.VIEW, {}, 1)
    with pytest.raises(AlreadyExists):
        store.commit("v", "k", {}, Usage(), 2)
    with pytest.raises(NotFound):
        store.commit("x", "nope", {}, Usage(), 2)
    with pytest.raises(FailedPrecondition):
        store.commit("x", "v", {}, Usage(), 2)
    assert store.get_info("k").kind is Kind.ACTIVE


def test_remove(store: MetaStore) -> None:
    committed(store, "base")
    store.create("child", "base", Kind.ACTIVE, {}, 1)
    with pytest.raises(FailedPrecondition, match="child"):
        store.remove("base")
    removed = store.remove("child")
    assert removed.kind is Kind.ACTIVE
    store.remove("base")
    with pytest.raises(NotFound):
        store.remove("base")
    assert store.list_infos() == []
    store.create("base", "", Kind.ACTIVE, {}, 1)  # names reusable at once


def test_ids_never_reused(store: MetaStore) -> None:
    ids = set()
    for i in range(5):
        ids.add(store.create(f"k{i}", "", Kind.ACTIVE, {}, 1).id)
    store.remove("k4")  # the highest id
    store.remove("k3")
    new = store.create("again", "", Kind.ACTIVE, {}, 1).id
    assert new not in ids and new > max(ids)


def test_update_rules(store: MetaStore) -> None:
    store.create("k", "", Kind.ACTIVE, {"a": "1", "b": "2"}, 1)
    info = store.update("k", {"c": "3"}, [], 5)
    assert dict(info.labels) == {"c": "3"} and info.updated_ns == 5 and info.created_ns == 1
    info = store.update("k", {"a": "x", "d": "4"}, ["labels.a", "labels.c"], 6)
    assert dict(info.labels) == {"a": "x"}
    info = store.update("k", {"z": "9"}, ["labels"], 7)
    assert dict(info.labels) == {"z": "9"}
    with pytest.raises(InvalidArgument, match="parent"):
        store.update("k", {}, ["parent"], 8)
    assert store.get_info("k").updated_ns == 7
    with pytest.raises(NotFound):
        store.update("nope", {}, [], 9)


def test_list_is_ordered_copy(store: MetaStore) -> None:
    for k in ["b", "a", "c"]:
        store.create(k, "", Kind.VIEW, {}, 1)
    infos = store.list_infos()
    assert [i.name for i in infos] == ["a", "b", "c"]
    store.remove("a")
    assert [i.name for i in infos] == ["a", "b", "c"]


def test_materialize_failure_records_nothing(store: MetaStore) -> None:
    seen: list[Snapshot] = []

    def boom(snap: Snapshot) -> None:
        seen.append(snap)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.create("k", "", Kind.ACTIVE, {}, 1, boom)
    assert len(seen) == 1
    with pytest.raises(NotFound):
        store.get_info("k")
    ok = store.create("k", "", Kind.ACTIVE, {}, 1, seen.append)
    assert seen[-1].id == ok.id


def test_cleanup_sees_live_ids(store: MetaStore) -> None:
    a = store.create("a", "", Kind.ACTIVE, {}, 1)
    b = store.create("b", "", Kind.ACTIVE, {}, 1)
    store.remove("a")
    got: list[frozenset[SnapshotId]] = []
    store.cleanup(got.append)
    assert got == [frozenset({b.id})]
    assert a.id not in got[0]


def test_close_twice(store: MetaStore) -> None:
    store.close()
    store.close()


def test_sqlite_survives_reopen_and_keeps_counter(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    s = SqliteStore(path)
    committed(s, "base")
    top = s.create("top", "base", Kind.ACTIVE, {"k": "v"}, 3)
    s.remove("top")
    s.close()
    s = SqliteStore(path)
    try:
        assert s.get_info("base").kind is Kind.COMMITTED
        again = s.create("top", "base", Kind.ACTIVE, {}, 4)
        assert again.id > top.id
        assert s.get_snapshot("top").parent_ids == (s.get_snapshot("base").id,)
    finally:
        s.close()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    import sqlite3

    s = SqliteStore(tmp_path / "m.db")
    s.close()
    db = sqlite3.connect(tmp_path / "m.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_apply_label_update_deletes_empty_values() -> None:
    assert apply_label_update({"a": "1"}, {"a": ""}, ["labels.a"], "k") == {}
    assert apply_label_update({"a": "1"}, {"a": "", "b": "2"}, [], "k") == {"b": "2"}
