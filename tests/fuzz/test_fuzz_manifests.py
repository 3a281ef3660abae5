"""JSON documents as they come from a registry: SOCI index manifests, image manifests, image
indexes (and referrers answers, which are image indexes).

Each document is mutated (`mutated_json`: wrong types, huge numbers, odd unicode, deleted or
extra keys, damaged bytes) and handed to the code that reads it:

- `index.manifest.parse_index` (CLI and daemon) → a `SociIndex` or `IndexManifestError`;
- `index.convert.select_manifests` over an image source (the CLI's `create`/`convert`) → the
  selected manifests or a `SociableError` (`ConvertError`, `OciError`);
- the daemon's discovery (`find_index_digest`, the v2 annotation) → a digest, `NoIndex` or
  `IndexFetchError`; its local unpack (`layer_diff_id`) → a diffID or `UnpackError`;
- `index.oci.responses.index_entries` (referrers) → descriptors or `UnexpectedResponseError`.

The registry side is a fake client at the seam: these are parsers, not transports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, cast

import trio
from hypothesis import example, given
from hypothesis import strategies as st

from index.convert import BuildOptions, select_manifests
from index.digest import Digest
from index.errors import SociableError
from index.manifest import IndexManifestError, SociIndex, ZtocDescriptor, new_index, parse_index
from index.oci import mediatypes as mt
from index.oci.client import AsyncRegistryClient
from index.oci.descriptor import Descriptor
from index.oci.errors import NotFoundError, UnexpectedResponseError
from index.oci.platform import Platform
from index.oci.reference import Reference
from index.oci.responses import index_entries
from snapshotter.remote.discovery import DiscoveryModes, find_index_digest
from snapshotter.remote.errors import IndexFetchError, NoIndex, UnpackError
from snapshotter.remote.unpack import layer_diff_id
from tests.fuzz.strategies import fuzz_settings, mutated_json

REF = Reference.parse("registry.test/fuzz/image:v1")
PLATFORMS = (Platform("linux", "amd64"), Platform("linux", "arm64", "v8"))


def _digest(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def soci_index(v2: bool) -> SociIndex:
    ztocs = [
        ZtocDescriptor(_digest(i), 1000 + i, _digest(100 + i), mt.OCI_LAYER_GZIP, 4 << 20)
        for i in range(3)
    ]
    subject = None if v2 else {"mediaType": mt.OCI_MANIFEST, "digest": _digest(7), "size": 9}
    return new_index(ztocs, v2=v2, subject=subject)


def _with_prefetch(index: SociIndex) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(index.to_json())
    doc["layers"].append(
        {
            "mediaType": mt.SOCI_PREFETCH,
            "digest": _digest(50),
            "size": 10,
            "annotations": {mt.ANNOTATION_LAYER_DIGEST: _digest(100)},
        }
    )
    return doc


SOCI_SAMPLES = (
    json.loads(soci_index(True).to_json()),
    json.loads(soci_index(False).to_json()),
    _with_prefetch(soci_index(False)),
)


def test_soci_indexes_round_trip() -> None:
    for v2 in (True, False):
        index = soci_index(v2)
        data = index.to_json()
        parsed = parse_index(data)
        assert parsed == index
        assert parsed.to_json() == data


def _check_index(index: SociIndex) -> None:
    """What the daemon relies on in a parsed index."""
    assert index.artifact_type in (mt.SOCI_INDEX_V1, mt.SOCI_INDEX_V2)
    for z in index.ztocs:
        assert isinstance(z.digest, Digest) and isinstance(z.layer_digest, Digest)
        assert isinstance(z.size, int) and isinstance(z.span_size, int)
        assert isinstance(z.layer_media_type, str)


@fuzz_settings(300)
@example(b'{"config": [], "layers": []}')
@example(b'{"config": "x"}')
@example(
    json.dumps(
        {
            "config": {"mediaType": mt.SOCI_INDEX_V2},
            "layers": [{"mediaType": mt.SOCI_ZTOC, "digest": str(_digest(1)), "annotations": []}],
        }
    ).encode()
)
@example(
    json.dumps(
        {
            "config": {"mediaType": mt.SOCI_INDEX_V2},
            "layers": [
                {
                    "mediaType": mt.SOCI_ZTOC,
                    "digest": str(_digest(1)),
                    "size": math.inf,
                    "annotations": {mt.ANNOTATION_LAYER_DIGEST: str(_digest(2))},
                }
            ],
        }
    ).encode()
)
@example(b'{"config": {"mediaType": "application/vnd.amazon.soci.index.v2+json"}, "layers": 7}')
@given(st.sampled_from(SOCI_SAMPLES).flatmap(mutated_json))
def test_soci_index_parse(data: bytes) -> None:
    try:
        index = parse_index(data)
    except IndexManifestError:
        return
    _check_index(index)


# --- image manifests and indexes --------------------------------------------------------------


def _manifest(n: int) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": str(_digest(900 + n)), "size": 20},
        "layers": [
            {"mediaType": mt.OCI_LAYER_GZIP, "digest": str(_digest(100 + n * 10 + i)), "size": 5}
            for i in range(2)
        ],
        "annotations": {mt.ANNOTATION_INDEX_DIGEST: str(_digest(500 + n))},
    }


def _config(n: int) -> dict[str, Any]:
    return {
        "architecture": PLATFORMS[n].architecture,
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": [str(_digest(300 + n * 10 + i)) for i in range(2)],
        },
    }


def _image_index(manifests: Sequence[bytes]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": str(Digest.of(data)),
                "size": len(data),
                "platform": PLATFORMS[i].to_json(),
            }
            for i, data in enumerate(manifests)
        ],
    }


class FakeSource:
    """An `ImageSource` over byte documents by digest; unknown digests are NotFoundError."""

    name = "fuzz-source"

    def __init__(self, root: Descriptor, blobs: dict[str, bytes]) -> None:
        self.root = root
        self.blobs = blobs

    def __repr__(self) -> str:
        docs = {d[7:15]: data[:300] for d, data in self.blobs.items()}
        return f"FakeSource(root={self.root.digest[7:15]}, blobs={docs!r})"

    def resolve(self) -> Descriptor:
        return self.root

    def read_manifest(self, desc: Descriptor) -> bytes:
        return self.read_blob(desc)

    def read_blob(self, desc: Descriptor) -> bytes:
        try:
            return self.blobs[desc.digest]
        except KeyError:
            raise NotFoundError(f"{desc.digest}: not found") from None

    def blob_file(self, desc: Descriptor) -> Any:
        raise AssertionError("select_manifests reads no layer")


def _valid_source() -> tuple[FakeSource, list[bytes]]:
    manifests = [json.dumps(_manifest(i)).encode() for i in range(2)]
    index = json.dumps(_image_index(manifests)).encode()
    blobs = {Digest.of(m): m for m in manifests}
    for i in range(2):
        config = _config(i)
        blobs[_digest(900 + i)] = json.dumps(config).encode()
    blobs[Digest.of(index)] = index
    return FakeSource(Descriptor.of(mt.OCI_INDEX, index), blobs), manifests


def test_valid_image_index_selects_every_platform() -> None:
    source, manifests = _valid_source()
    selected = select_manifests(source, BuildOptions(all_platforms=True))
    assert [m.raw for m in selected.manifests] == manifests
    assert [m.platform for m in selected.manifests] == list(PLATFORMS)
    assert [len(m.layers) for m in selected.manifests] == [2, 2]


@st.composite
def damaged_sources(draw: st.DrawFn) -> FakeSource:
    """The valid image with its index, one manifest or one config mutated. A mutated
    child keeps its digest in the index (a registry answering the wrong bytes is the
    transport's check): the parser sees the damaged document."""
    source, manifests = _valid_source()
    which = draw(st.sampled_from(("index", "manifest", "config", "lone manifest")))
    if which == "index":
        data = draw(mutated_json(_image_index(manifests)))
        source.blobs[source.root.digest] = data
    elif which == "manifest":
        i = draw(st.integers(0, 1))
        source.blobs[Digest.of(manifests[i])] = draw(mutated_json(_manifest(i)))
    elif which == "config":
        i = draw(st.integers(0, 1))
        source.blobs[_digest(900 + i)] = draw(mutated_json(_config(i)))
    else:
        data = draw(mutated_json(_manifest(0)))
        source.root = Descriptor.of(mt.OCI_MANIFEST, data)
        source.blobs[source.root.digest] = data
    return source


@fuzz_settings(300)
@given(damaged_sources(), st.booleans())
def test_image_documents_from_a_source(source: FakeSource, every: bool) -> None:
    opts = BuildOptions(all_platforms=every, platforms=() if every else (PLATFORMS[1],))
    try:
        selected = select_manifests(source, opts)
        for m in selected.manifests:
            for layer in m.layers:
                assert isinstance(layer.digest, Digest)
    except SociableError:
        pass


# --- the daemon's readers -----------------------------------------------------------------------


class FakeClient:
    """The two reads discovery and local unpack make, answered from byte documents."""

    def __init__(self, manifests: dict[str, bytes], blobs: dict[str, bytes]) -> None:
        self.manifests = manifests
        self.blobs = blobs

    async def get_manifest(
        self, ref: Reference, digest: Digest | None = None, *, accept: Sequence[str] = ()
    ) -> tuple[Descriptor, bytes]:
        await trio.lowlevel.checkpoint()
        data = self.manifests.get(str(digest))
        if data is None:
            raise NotFoundError(f"manifest {digest}: not found")
        return Descriptor.of(mt.OCI_MANIFEST, data), data

    async def read_blob(self, ref: Reference, digest: Digest) -> bytes:
        await trio.lowlevel.checkpoint()
        data = self.blobs.get(str(digest))
        if data is None:
            raise NotFoundError(f"blob {digest}: not found")
        return data


MANIFEST = _digest(1234)
LAYER = _digest(100 + 1)


def test_discovery_and_diff_id_of_the_valid_image() -> None:
    client = cast(
        AsyncRegistryClient,
        FakeClient(
            {MANIFEST: json.dumps(_manifest(0)).encode()},
            {_digest(900): json.dumps(_config(0)).encode()},
        ),
    )
    modes = DiscoveryModes(soci_v2=True, soci_v1=False, local_store=False)
    found = trio.run(find_index_digest, client, cast(Any, None), REF, MANIFEST, None, modes)
    assert found == (_digest(500), "v2")
    diff_id = trio.run(layer_diff_id, client, REF, MANIFEST, LAYER)
    assert diff_id == (_digest(301), mt.OCI_LAYER_GZIP)


@fuzz_settings(250)
@example(json.dumps({"annotations": ["x"]}).encode())
@example(json.dumps({"annotations": {mt.ANNOTATION_INDEX_DIGEST: 5}}).encode())
@given(mutated_json(_manifest(0)))
def test_discovery_reads_a_damaged_manifest(data: bytes) -> None:
    client = cast(AsyncRegistryClient, FakeClient({MANIFEST: data}, {}))
    modes = DiscoveryModes(soci_v2=True, soci_v1=False, local_store=False)
    try:
        digest, how = trio.run(
            find_index_digest, client, cast(Any, None), REF, MANIFEST, None, modes
        )
    except (NoIndex, IndexFetchError):
        return
    assert isinstance(digest, Digest) and how == "v2"


@fuzz_settings(250)
@given(mutated_json(_manifest(0)), mutated_json(_config(0)), st.booleans())
def test_local_unpack_reads_damaged_documents(
    manifest: bytes, config: bytes, damage_manifest: bool
) -> None:
    client = cast(
        AsyncRegistryClient,
        FakeClient(
            {MANIFEST: manifest if damage_manifest else json.dumps(_manifest(0)).encode()},
            {_digest(900): json.dumps(_config(0)).encode() if damage_manifest else config},
        ),
    )
    try:
        diff_id, media_type = trio.run(layer_diff_id, client, REF, MANIFEST, LAYER)
    except UnpackError:
        return
    assert isinstance(diff_id, Digest) and isinstance(media_type, str)


@fuzz_settings(200)
@example(b'{"manifests": 5}')
@example(b'{"manifests": true}')
@given(mutated_json(_image_index([json.dumps(_manifest(i)).encode() for i in range(2)])))
def test_referrers_answer(data: bytes) -> None:
    try:
        entries = index_entries(data, "https://registry.test/v2/x/referrers/y", None)
    except UnexpectedResponseError:
        return
    assert all(isinstance(d, Descriptor) for d in entries)
