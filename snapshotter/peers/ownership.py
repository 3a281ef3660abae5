"""Who owns a chunk of a layer: rendezvous (highest random weight) hashing, no lookups.

A chunk is an aligned run of a layer's spans: span `s` belongs to chunk
`compressed_start(s) // chunk_bytes`, so every node computes the same chunks from the same
zTOC. Each (layer digest, chunk) is scored against every candidate node with one hash; the
`count` highest scores are its owners, best first. Adding or removing a node moves only the
chunks that node wins or held (about 1/N of them), and the chunks of one layer spread over
all nodes, so no node serves a whole image. Pure: no I/O, no trio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def chunk_of(compressed_start: int, chunk_bytes: int) -> int:
    """The chunk a span starting at `compressed_start` belongs to."""
    return compressed_start // chunk_bytes


def score(node_id: str, layer: str, chunk: int) -> int:
    """The rendezvous score of `node_id` (its `ADDR:PORT`) for (layer digest, chunk)."""
    key = f"{node_id}\0{layer}\0{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def owners(candidates: Iterable[tuple[str, T]], layer: str, chunk: int, count: int) -> list[T]:
    """The `count` owners of (layer, chunk) among `candidates` (pairs of node id and the value
    to return for it), highest score first; ties broken by node id."""
    ranked = sorted(candidates, key=lambda c: (score(c[0], layer, chunk), c[0]), reverse=True)
    return [value for _, value in ranked[:count]]
