"""Unit tests of snapshotter.remote: labels, discovery order, CRI wire format (the local
applier: test_apply.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from index.digest import Digest
from index.oci import mediatypes as mt
from index.oci.descriptor import Descriptor
from index.oci.errors import NotFoundError
from index.oci.reference import Reference
from index.store import LocalStore
from snapshotter.cri.pull import decode_pull_response, encode_pull_request
from snapshotter.remote import labels as L
from snapshotter.remote.discovery import DiscoveryModes, find_index_digest
from snapshotter.remote.errors import BadLabels, IndexFetchError, NoIndex
from snapshotter.remote.records import LayerRecord, layer_name
from tests.support.containerd import cri_message

D1 = Digest("sha256:" + "1" * 64)
D2 = Digest("sha256:" + "2" * 64)
D3 = Digest("sha256:" + "3" * 64)
D4 = Digest("sha256:" + "4" * 64)
REF = Reference.parse("registry.test/app:1")


def cri_labels(**extra: str) -> dict[str, str]:
    return {
        L.TARGET_REF: "sha256:chain",
        L.CRI_IMAGE_REF: "registry.test/app:1",
        L.CRI_MANIFEST_DIGEST: D1,
        L.CRI_LAYER_DIGEST: D2,
        L.CRI_IMAGE_LAYERS: f"{D2},{D3}",
        **extra,
    }


def test_labels_parse() -> None:
    ll = L.LayerLabels.parse(cri_labels(**{L.SOCI_INDEX_DIGEST: D4}))
    assert (ll.manifest_digest, ll.layer_digest, ll.index_digest) == (D1, D2, D4)
    assert ll.image_layers == (D2, D3)
    with pytest.raises(BadLabels, match=r"cri\.manifest-digest"):
        L.LayerLabels.parse({L.TARGET_REF: "x", L.CRI_IMAGE_REF: "r", L.CRI_LAYER_DIGEST: D2})
    with pytest.raises(BadLabels, match="malformed"):
        L.LayerLabels.parse(cri_labels(**{L.CRI_LAYER_DIGEST: "sha256:nothex"}))


def test_layer_name_and_record() -> None:
    assert layer_name(Path("/r/snapshots/12/fs")) == "snap-12"
    assert layer_name(Path("/r/snapshots/trash-12-99999/fs")) == "snap-12"
    with pytest.raises(ValueError):
        layer_name(Path("/r/snapshots/12/work"))
    rec = LayerRecord("registry.test/app:1", D1, D2, D3, D4, slot=7)
    assert LayerRecord.from_json(rec.to_json()) == rec
    local = LayerRecord("registry.test/app:1", D1, D2, "", "", local=True)
    assert LayerRecord.from_json(local.to_json()) == local
    # a record written before `local` existed reads as a lazy layer's
    older = {k: v for k, v in json.loads(rec.to_json()).items() if k != "local"}
    assert LayerRecord.from_json(json.dumps(older).encode()) == rec
    for bad in (b"[]", b'{"image_ref": "x"}'):
        with pytest.raises(TypeError):
            LayerRecord.from_json(bad)


class FakeClient:
    """get_manifest/referrers answering from dicts; records the calls."""

    def __init__(self, manifests: dict[str, bytes], referrers: list[Descriptor]) -> None:
        self.manifests = manifests
        self.referrer_list = referrers
        self.calls: list[str] = []

    async def get_manifest(
        self, ref: Reference, digest: Digest, **kw: Any
    ) -> tuple[Descriptor, bytes]:
        self.calls.append(f"manifest {digest}")
        if digest not in self.manifests:
            raise NotFoundError(f"{digest} not found")
        data = self.manifests[digest]
        return Descriptor(mt.OCI_MANIFEST, Digest.of(data), len(data)), data

    async def referrers(
        self, ref: Reference, subject: Digest, artifact_type: str
    ) -> list[Descriptor]:
        self.calls.append(f"referrers {subject} {artifact_type}")
        return self.referrer_list


def manifest_with(annotation: str | None) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "layers": []}
    if annotation:
        doc["annotations"] = {mt.ANNOTATION_INDEX_DIGEST: annotation}
    return json.dumps(doc).encode()


async def test_discovery_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    v1 = [Descriptor(mt.OCI_MANIFEST, D3, 10, artifact_type=mt.SOCI_INDEX_V1)]
    both = FakeClient({D1: manifest_with(D4)}, v1)
    modes = DiscoveryModes(soci_v2=True, soci_v1=True)
    # 1. the explicit label wins without asking the registry
    assert await find_index_digest(both, store, REF, D1, D2, modes) == (D2, "label")  # type: ignore[arg-type]
    assert both.calls == []
    # 2. the v2 annotation comes before referrers
    assert await find_index_digest(both, store, REF, D1, None, modes) == (D4, "v2")  # type: ignore[arg-type]
    assert both.calls == [f"manifest {D1}"]
    # 3. referrers when the manifest has no annotation (and only when enabled)
    plain = FakeClient({D1: manifest_with(None)}, v1)
    assert await find_index_digest(plain, store, REF, D1, None, modes) == (D3, "v1")  # type: ignore[arg-type]
    with pytest.raises(NoIndex):
        await find_index_digest(plain, store, REF, D1, None, DiscoveryModes())  # type: ignore[arg-type]
    # 4. the local store's record last
    store.add_index(D2, 100, str(D1), "registry.test/app:1", "", mt.SOCI_INDEX_V2, [])
    assert await find_index_digest(plain, store, REF, D1, None, DiscoveryModes()) == (D2, "local")  # type: ignore[arg-type]
    with pytest.raises(NoIndex, match="disabled"):
        await find_index_digest(plain, store, REF, D1, None, DiscoveryModes(False, False, False))  # type: ignore[arg-type]
    bad = FakeClient({D1: manifest_with("sha256:short")}, [])
    with pytest.raises(IndexFetchError):
        await find_index_digest(bad, store, REF, D1, None, modes)  # type: ignore[arg-type]
    store.close()


def test_cri_wire_format_matches_protobuf() -> None:
    raw = encode_pull_request("registry.test/app:1", "user", "pass")
    req = cri_message("PullImageRequest").FromString(raw)
    assert req.image.image == "registry.test/app:1"
    assert (req.auth.username, req.auth.password) == ("user", "pass")
    assert not cri_message("PullImageRequest").FromString(encode_pull_request("x")).HasField("auth")
    answer = cri_message("PullImageResponse")(image_ref="sha256:" + "a" * 64).SerializeToString()
    assert decode_pull_response(answer) == "sha256:" + "a" * 64
    assert decode_pull_response(b"") == ""
