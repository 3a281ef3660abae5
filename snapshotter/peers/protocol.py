"""The owner protocol's wire details, shared by the peer client and the peer listener.

A peer request is an OCI distribution blob read with a byte range, so any node is also a
plain registry mirror for a blob it holds:

    GET /v2/<repository>/blobs/<layer digest>?ns=<registry>
    Range: bytes=<start>-<end - 1>              span-aligned, within one chunk
    X-Sociable-Ztoc: <zTOC digest>              how the owner verifies what it fetches
    X-Sociable-Fetch: 1                         the owner may fetch from its own upstream
    X-Sociable-Budget-Ms: <ms>                  how long the requester waits
    X-Sociable-Token: <shared secret>           only when the cluster configures one

Answers: 206 with exactly the range (verified spans); 404 the node does not hold the range
and will not fetch it; 503 it could not fetch it (no credentials for that repository, its
registry failed, out of time); 403 the client is not a member or the token is wrong;
416 the range is not span-aligned or outside the blob. Registry credentials never appear in
either direction.
"""

from __future__ import annotations

from typing import Final

ZTOC_HEADER: Final = "x-sociable-ztoc"
FETCH_HEADER: Final = "x-sociable-fetch"
BUDGET_HEADER: Final = "x-sociable-budget-ms"
TOKEN_HEADER: Final = "x-sociable-token"
LOCAL_HEADER: Final = "x-sociable-local"
"""On a registry-mirror request from another member: answer from this node's own content
store only (never ask further members)."""
DIGEST_HEADER: Final = "docker-content-digest"


def blob_path(repository: str, digest: str) -> str:
    """The OCI distribution path of a blob."""
    return f"/v2/{repository}/blobs/{digest}"


def range_header(start: int, end: int) -> str:
    """`Range` for `[start, end)`."""
    return f"bytes={start}-{end - 1}"


def parse_range(value: str) -> tuple[int, int] | None:
    """`bytes=S-E` → `[S, E + 1)`; None for anything else (suffix or multiple ranges, or
    garbage); an open end `bytes=S-` → `(S, -1)`."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep or not first.isdigit():
        return None
    if not last:
        return int(first), -1
    if not last.isdigit() or int(last) < int(first):
        return None
    return int(first), int(last) + 1
