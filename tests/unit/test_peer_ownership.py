"""Chunk ownership (rendezvous hashing): deterministic, spread over the nodes, stable when a
node leaves or joins, `count` honoured, ties broken by node id."""

from __future__ import annotations

import collections
import itertools

import pytest

from snapshotter.peers import ownership
from snapshotter.peers.ownership import chunk_of, owners, score

LAYER = "sha256:" + "ab" * 32
NODES = ("10.0.0.1:8472", "10.0.0.2:8472", "10.0.0.3:8472", "10.0.0.4:8472")
CHUNKS = 200


def cands(nodes: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    return [(n, n) for n in nodes]


def test_chunk_of_is_floor_division_by_chunk_bytes() -> None:
    assert chunk_of(0, 1024) == 0
    assert chunk_of(1023, 1024) == 0
    assert chunk_of(1024, 1024) == 1
    assert chunk_of(10 * 1024 + 5, 1024) == 10


def test_owners_are_deterministic_and_independent_of_candidate_order() -> None:
    first = [owners(cands(NODES), LAYER, c, 2) for c in range(CHUNKS)]
    for perm in itertools.permutations(NODES):
        assert [owners(cands(perm), LAYER, c, 2) for c in range(CHUNKS)] == first
    # the score is a pure function of (node, layer, chunk), and depends on each of them
    assert score(NODES[0], LAYER, 3) == score(NODES[0], LAYER, 3)
    assert score(NODES[0], LAYER, 3) != score(NODES[1], LAYER, 3)
    assert score(NODES[0], LAYER, 3) != score(NODES[0], LAYER, 4)
    assert score(NODES[0], LAYER, 3) != score(NODES[0], "sha256:" + "cd" * 32, 3)


def test_the_values_returned_are_the_candidates_values() -> None:
    got = owners([(n, i) for i, n in enumerate(NODES)], LAYER, 7, 4)
    assert sorted(got) == [0, 1, 2, 3]


def test_chunks_of_one_layer_spread_over_every_node() -> None:
    first_owner = [owners(cands(NODES), LAYER, c, 1) for c in range(CHUNKS)]
    assert all(len(o) == 1 for o in first_owner), "every chunk has an owner"
    counts = collections.Counter(o[0] for o in first_owner)
    assert set(counts) == set(NODES), counts
    assert max(counts.values()) <= 0.45 * CHUNKS, counts
    # with two owners, each node is among them for about half the chunks
    pairs = collections.Counter(n for c in range(CHUNKS) for n in owners(cands(NODES), LAYER, c, 2))
    assert all(0.3 * CHUNKS <= pairs[n] <= 0.7 * CHUNKS for n in NODES), pairs


def test_removing_a_node_moves_only_the_chunks_it_owned() -> None:
    gone = NODES[2]
    rest = [n for n in NODES if n != gone]
    moved_single = 0
    for c in range(CHUNKS):
        before = owners(cands(NODES), LAYER, c, 2)
        after = owners(cands(rest), LAYER, c, 2)
        if gone not in before:
            assert after == before, f"chunk {c} moved though {gone} did not own it"
        else:
            # the other owner keeps it, in the same relative order; one new owner joins
            kept = [n for n in before if n != gone]
            assert [n for n in after if n in kept] == kept
            assert len(after) == 2 and gone not in after
        b1 = owners(cands(NODES), LAYER, c, 1)
        a1 = owners(cands(rest), LAYER, c, 1)
        if b1 != [gone]:
            assert a1 == b1
        else:
            moved_single += 1
    # about a quarter of the chunks had the removed node first: only those moved
    assert 0 < moved_single <= 0.45 * CHUNKS


def test_adding_a_node_moves_only_the_chunks_it_wins() -> None:
    new = "10.0.0.9:8472"
    grown = [*NODES, new]
    won = 0
    for c in range(CHUNKS):
        before = owners(cands(NODES), LAYER, c, 1)
        after = owners(cands(grown), LAYER, c, 1)
        if after != before:
            assert after == [new], f"chunk {c} moved between old nodes"
            won += 1
    assert 0.1 * CHUNKS <= won <= 0.35 * CHUNKS, won


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 7])
def test_count_is_honoured(count: int) -> None:
    for c in range(20):
        got = owners(cands(NODES), LAYER, c, count)
        assert len(got) == min(count, len(NODES))
        assert len(set(got)) == len(got)
        # the first `count` of the full ranking
        assert got == owners(cands(NODES), LAYER, c, len(NODES))[: len(got)]


def test_no_candidates_means_no_owner() -> None:
    assert owners([], LAYER, 0, 2) == []


def test_ties_are_broken_by_node_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ownership, "score", lambda node, layer, chunk: 42)
    for perm in itertools.permutations(NODES):
        assert owners(cands(perm), LAYER, 0, 4) == sorted(NODES, reverse=True)
    assert owners(cands(NODES), LAYER, 0, 1) == [max(NODES)]
