"""containerd's filter grammar over snapshot Info."""

from __future__ import annotations

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.snapshots.filters import parse, parse_all
from snapshotter.snapshots.model import Info, Kind, quote

INFOS = [
    Info("base", "", Kind.COMMITTED, 1, 1, {"containerd.io/snapshot.ref": "sha256:aa", "l": "1"}),
    Info("k8s.io/4/extract sha256:bb", "base", Kind.ACTIVE, 1, 1, {"a.b": "dotted"}),
    Info("view", "base", Kind.VIEW, 1, 1, {}),
]


def names(*filters: str) -> list[str]:
    match = parse_all(filters)
    return [i.name for i in INFOS if match(i)]


def test_empty_matches_everything() -> None:
    assert names() == [i.name for i in INFOS]
    assert names("") == [i.name for i in INFOS]


def test_kind_name_parent() -> None:
    assert names("kind==committed") == ["base"]
    assert names("kind!=committed") == ["k8s.io/4/extract sha256:bb", "view"]
    assert names('name=="k8s.io/4/extract sha256:bb"') == ["k8s.io/4/extract sha256:bb"]
    assert names("parent==base") == ["k8s.io/4/extract sha256:bb", "view"]
    assert names('parent==""') == ["base"]
    assert names('parent!=""') == ["k8s.io/4/extract sha256:bb", "view"]


def test_labels_quoted_and_presence() -> None:
    assert names('labels."containerd.io/snapshot.ref"==sha256:aa') == ["base"]
    assert names('labels."containerd.io/snapshot.ref"') == ["base"]
    assert names("labels.l") == ["base"]
    assert names("labels.a.b==dotted") == ["k8s.io/4/extract sha256:bb"]
    assert names('labels."a.b"') == ["k8s.io/4/extract sha256:bb"]
    # Absent label: != compares with "" (containerd semantics), == never matches.
    assert names("labels.l!=1") == ["k8s.io/4/extract sha256:bb", "view"]


def test_handshake_filter_from_containerd() -> None:
    f = 'labels."containerd.io/snapshot.ref"==sha256:aa,parent==""'
    assert names(f) == ["base"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:aa,parent=="x"') == []


def test_and_within_or_across() -> None:
    assert names("kind==view,parent==base") == ["view"]
    assert names("kind==view", "name==base") == ["base", "view"]


def test_regex_forms() -> None:
    assert names("name~=^k8s") == ["k8s.io/4/extract sha256:bb"]
    assert names("name~=/^vi/") == ["view"]
    assert names("name~=|w$|") == ["view"]
    assert names('name~="e$"') == ["base"]
    assert names(r"name~=/a\/b/") == []


def test_whitespace_and_escapes() -> None:
    assert names(" kind == view , parent == base ") == ["view"]
    assert names('name=="\\x76iew"') == ["view"]


@pytest.mark.parametrize(
    "bad",
    [
        "kind==",
        "kind=>x",
        "kind=",
        'labels."unterminated',
        "labels.",
        ".name",
        "name~=(",
        "name==/x/",
        "name==a b",
        ",",
        "kind==view,",
        'name=="\\q"',
    ],
)
def test_malformed_is_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_all([bad])
    assert quote(bad) in str(ei.value)
    assert "offset" in str(ei.value)


def test_one_bad_string_fails_the_whole_request() -> None:
    with pytest.raises(InvalidArgument):
        parse_all(["kind==view", "kind=="])


def test_parse_returns_selectors() -> None:
    sels = parse('labels."x.y"~=/a/,name')
    assert [s.fieldpath for s in sels] == [("labels", "x.y"), ("name",)]
    assert [s.op for s in sels] == ["~=", None]
