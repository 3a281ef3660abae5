"""containerd's config.toml merged by `install`: every other setting and comment kept, our
settings in the keys of the file's version, refusals for what cannot be merged."""

from __future__ import annotations

import tomllib

import pytest

from snapshotter.config import Config
from snapshotter.configcheck import ContainerdVersion as V
from snapshotter.configcheck import check_containerd
from snapshotter.install.containerd import (
    ContainerdConfigError,
    OurSettings,
    config_version_for,
    fragment,
    merge,
)

OURS = OurSettings("sociable", "/run/sociable/sociable.sock", "/var/lib/sociable")
MIRROR = OurSettings("sociable", "/run/sociable/sociable.sock", "/var/lib/sociable", mirror=True)

DEBIAN = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""

AL2_TEMPLATE = """\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
# Users can use the following import directory to add additional
# configuration to containerd. The imports do not behave exactly like overrides.
imports = ["/etc/containerd/config.d/*.toml"]

[grpc]
address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
discard_unpacked_layers = true  # the AMI's choice

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "SANDBOX_IMAGE"

[plugins."io.containerd.grpc.v1.cri".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
SystemdCgroup = true

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = "/opt/cni/bin"
conf_dir = "/etc/cni/net.d"
"""

AL2023_V3 = """\
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
address = "/run/containerd/containerd.sock"

[plugins.'io.containerd.cri.v1.images']
discard_unpacked_layers = true

[plugins.'io.containerd.cri.v1.images'.pinned_images]
sandbox = "localhost/kubernetes/pause"

[plugins."io.containerd.cri.v1.images".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"

[plugins.'io.containerd.cri.v1.runtime']
enable_cdi = true
"""


def _without(data: dict[str, object], *paths: tuple[str, ...]) -> dict[str, object]:
    """`data` (nested dicts) without the key `paths`, and without tables left empty."""
    import copy

    out = copy.deepcopy(data)
    for path in paths:
        cur: object = out
        for key in path[:-1]:
            assert isinstance(cur, dict)
            cur = cur.get(key, {})
        assert isinstance(cur, dict)
        cur.pop(path[-1], None)

    def prune(d: dict[str, object]) -> dict[str, object]:
        return {
            k: prune(v) if isinstance(v, dict) else v
            for k, v in d.items()
            if not (isinstance(v, dict) and not prune(v))
        }

    return prune(out)


def _in_order(lines: list[str], within: list[str]) -> bool:
    """Whether `lines` appear in `within` in the same order (others may be between)."""
    it = iter(within)
    return all(any(line == other for other in it) for line in lines)


CRI = "io.containerd.grpc.v1.cri"
OUR_V2 = (
    ("proxy_plugins", "sociable"),
    ("plugins", CRI, "containerd", "snapshotter"),
    ("plugins", CRI, "containerd", "disable_snapshot_annotations"),
)


def test_debian_default_gets_our_settings_and_keeps_its_own() -> None:
    out = merge(DEBIAN, OURS, containerd=V(1, 6, 0), where="config.toml")
    data = tomllib.loads(out.text)
    assert data["proxy_plugins"]["sociable"] == {
        "type": "snapshot",
        "address": "/run/sociable/sociable.sock",
    }
    assert data["plugins"][CRI]["containerd"] == {
        "snapshotter": "sociable",
        "disable_snapshot_annotations": False,
    }
    assert data["plugins"][CRI]["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert data["plugins"][CRI]["cni"]["bin_dir"] == "/usr/lib/cni"
    assert data["plugins"]["io.containerd.internal.v1.opt"]["path"] == "/var/lib/containerd/opt"
    assert _in_order(DEBIAN.splitlines(), out.text.splitlines())
    assert check_containerd(Config(), OURS.address, out.text, "x") == []
    assert out.warnings == ()


def test_comments_order_and_other_settings_survive_and_imports_warn() -> None:
    out = merge(AL2_TEMPLATE, MIRROR, containerd=V(1, 7, 0), where="template")
    # every original line but the one we change is still there, in its order
    kept = [line for line in AL2_TEMPLATE.splitlines() if "discard_unpacked_layers" not in line]
    assert _in_order(kept, out.text.splitlines())
    data = tomllib.loads(out.text)
    images = data["plugins"][CRI]["containerd"]
    assert images["discard_unpacked_layers"] is False  # the mirror serves unpacked layers
    assert images["default_runtime_name"] == "runc"
    # an existing registry config_path is kept as it is
    assert data["plugins"][CRI]["registry"]["config_path"] == (
        "/etc/containerd/certs.d:/etc/docker/certs.d"
    )
    before = tomllib.loads(AL2_TEMPLATE)
    assert _without(data, *OUR_V2, ("plugins", CRI, "containerd", "discard_unpacked_layers")) == (
        _without(before, ("plugins", CRI, "containerd", "discard_unpacked_layers"))
    )
    assert len(out.warnings) == 1 and "imports" in out.warnings[0]
    assert "config.d" in out.warnings[0]


def test_version_3_file_gets_version_3_keys_and_exports_root() -> None:
    out = merge(AL2023_V3, MIRROR, containerd=V(2, 1, 0), where="v3")
    data = tomllib.loads(out.text)
    images = data["plugins"]["io.containerd.cri.v1.images"]
    assert images["snapshotter"] == "sociable"
    assert images["disable_snapshot_annotations"] is False
    assert images["discard_unpacked_layers"] is False
    assert images["use_local_image_pull"] is True
    assert images["pinned_images"] == {"sandbox": "localhost/kubernetes/pause"}
    assert data["proxy_plugins"]["sociable"]["exports"] == {"root": "/var/lib/sociable"}
    assert CRI not in data.get("plugins", {})
    assert data["plugins"]["io.containerd.cri.v1.runtime"] == {"enable_cdi": True}
    assert check_containerd(Config(), OURS.address, out.text, "x") == []


def test_version_2_file_on_containerd_2_keeps_version_2_keys() -> None:
    out = merge(DEBIAN, OURS, containerd=V(2, 0, 0), where="x")
    data = tomllib.loads(out.text)
    assert data["version"] == 2
    assert data["plugins"][CRI]["containerd"]["snapshotter"] == "sociable"


@pytest.mark.parametrize(
    ("containerd", "version"), [(V(1, 6, 20), 2), (V(1, 7, 27), 2), (V(2, 1, 0), 3)]
)
def test_absent_file_becomes_a_minimal_one_for_the_installed_containerd(
    containerd: V, version: int
) -> None:
    out = merge(None, OURS, containerd=containerd, where="new")
    data = tomllib.loads(out.text)
    assert data["version"] == version == config_version_for(containerd)
    assert check_containerd(Config(), OURS.address, out.text, "new") == []
    assert set(data) == {"version", "plugins", "proxy_plugins"}


def test_merging_twice_changes_nothing() -> None:
    for text, ctd in (
        (DEBIAN, V(1, 6, 20)),
        (AL2_TEMPLATE, V(1, 7, 27)),
        (AL2023_V3, V(2, 1, 0)),
        (None, V(1, 6, 20)),
    ):
        once = merge(text, MIRROR, containerd=ctd, where="x").text
        assert merge(once, MIRROR, containerd=ctd, where="x").text == once


def test_wrong_values_of_ours_are_replaced() -> None:
    text = DEBIAN + '\n[proxy_plugins.sociable]\ntype = "content"\naddress = "/old.sock"\n'
    data = tomllib.loads(merge(text, OURS, containerd=V(1, 6, 0), where="x").text)
    assert data["proxy_plugins"]["sociable"] == {
        "type": "snapshot",
        "address": "/run/sociable/sociable.sock",
    }


@pytest.mark.parametrize(
    ("text", "containerd", "message"),
    [
        ('root = "/var/lib/containerd"\n', V(1, 6, 20), "version 1"),
        ("version = 3\n", V(1, 7, 27), "reads version 2 only"),
        ("version = 1\n", V(1, 6, 20), "needs version = 2"),
        ("version = 2\n[plugins\n", V(1, 6, 20), "not valid TOML"),
        ('version = 2\nproxy_plugins = "x"\n', V(1, 6, 20), "not a table"),
    ],
)
def test_what_cannot_be_merged_is_refused(text: str, containerd: V, message: str) -> None:
    with pytest.raises(ContainerdConfigError, match=message):
        merge(text, OURS, containerd=containerd, where="cfg")


def test_fragment_is_ours_only() -> None:
    v2 = tomllib.loads(fragment(V(1, 7, 0), OURS, registry=False))
    assert v2 == {
        "proxy_plugins": {"sociable": {"type": "snapshot", "address": OURS.address}},
        "plugins": {
            CRI: {"containerd": {"snapshotter": "sociable", "disable_snapshot_annotations": False}}
        },
    }
    v3 = tomllib.loads(fragment(V(2, 0, 0), MIRROR))
    images = v3["plugins"]["io.containerd.cri.v1.images"]
    assert images["registry"] == {"config_path": "/etc/containerd/certs.d"}
    assert images["use_local_image_pull"] is True


@pytest.mark.parametrize(
    ("containerd", "exported"),
    [(V(1, 6, 20), False), (V(1, 6, 32), True), (V(1, 7, 15), False), (V(1, 7, 16), True)],
)
def test_version_2_gets_the_root_export_where_containerd_reads_it(
    containerd: V, exported: bool
) -> None:
    data = tomllib.loads(merge(DEBIAN, OURS, containerd=containerd, where="x").text)
    plugin = data["proxy_plugins"]["sociable"]
    assert ("exports" in plugin) is exported
    if exported:
        assert plugin["exports"] == {"root": "/var/lib/sociable"}
    assert "exports" in tomllib.loads(fragment(V(1, 7, 27), OURS))["proxy_plugins"]["sociable"]
