"""Reference parsing and normalisation, as docker/containerd do it."""

from __future__ import annotations

import pytest

from index.digest import Digest
from index.oci.errors import InvalidReferenceError
from index.oci.reference import Reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "normal"),
    [
        ("busybox", "docker.io", "library/busybox", None, None, "docker.io/library/busybox"),
        (
            "busybox:1.36",
            "docker.io",
            "library/busybox",
            "1.36",
            None,
            "docker.io/library/busybox:1.36",
        ),
        ("user/app", "docker.io", "user/app", None, None, "docker.io/user/app"),
        (
            "index.docker.io/library/x:t",
            "docker.io",
            "library/x",
            "t",
            None,
            "docker.io/library/x:t",
        ),
        ("docker.io/x", "docker.io", "library/x", None, None, "docker.io/library/x"),
        ("localhost/app", "localhost", "app", None, None, "localhost/app"),
        ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None, "localhost:5000/a/b:c"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", None, None, "127.0.0.1:5000/x"),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None, "[::1]:5000/x:y"),
        ("public.ecr.aws/a/b-c_d.e__f", "public.ecr.aws", "a/b-c_d.e__f", None, None, None),
        (f"ghcr.io/o/r@{D}", "ghcr.io", "o/r", None, D, None),
        (f"ghcr.io/o/r:v1@{D}", "ghcr.io", "o/r", "v1", D, None),
        (f"alpine@{D}", "docker.io", "library/alpine", None, D, f"docker.io/library/alpine@{D}"),
    ],
)
def test_parse(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    normal: str | None,
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert str(ref) == (normal or text)
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "Busybox",
        "docker.io/UPPER/x",
        "x:bad tag",
        "x:-tag",
        "x@sha256:short",
        "x@md5:" + "a" * 32,
        "host:port/x",
        "a//b",
        "a/b/",
        "x:" + "t" * 129,
        "r.io/" + "a" * 260,
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        Reference.parse(text)
    assert isinstance(info.value, ValueError)
    assert repr(text)[1:-1][:20] in str(info.value) or text == ""


def test_object_and_defaults() -> None:
    ref = Reference.parse("localhost:5000/x")
    with pytest.raises(InvalidReferenceError):
        _ = ref.object
    assert ref.with_default_tag().object == "latest"
    pinned = ref.with_digest(Digest(D))
    assert pinned.object == D and pinned.with_default_tag() == pinned
    both = Reference.parse(f"localhost:5000/x:t@{D}")
    assert both.object == D
    assert ref.with_tag("v2").object == "v2"
    assert ref.name == "localhost:5000/x"
    with pytest.raises(InvalidReferenceError):
        ref.with_tag("no/slash")
