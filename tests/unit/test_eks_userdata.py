"""EKS user data: read as cloud-init and nodeadm read it (MIME parts, the NodeConfig's field
names), its containerd TOML accepted by the real containerd here and by `config check`, its
shell clean under shellcheck."""

from __future__ import annotations

import email
import email.message
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomlkit
import yaml

from snapshotter.config import load
from snapshotter.configcheck import ContainerdVersion as V
from snapshotter.errors import UsageError
from snapshotter.install.bundle import INSTALL_SH
from snapshotter.install.eks import (
    NODECONFIG_API,
    NODECONFIG_TYPE,
    UserDataOptions,
    daemon_config,
    user_data,
)

REPO = Path(__file__).resolve().parents[2]
CA = "Y2VydGlmaWNhdGVBdXRob3JpdHk="
ENDPOINT = "unix:///run/sociable/cri.sock"

# The fields of nodeadm's NodeConfig (node.eks.aws/v1alpha1, nodeconfig_types.go) that user
# data may set: name -> type, or name -> nested schema.
NODECONFIG_SCHEMA: dict[str, Any] = {
    "apiVersion": str,
    "kind": str,
    "metadata": dict,
    "spec": {
        "cluster": {
            "name": str,
            "apiServerEndpoint": str,
            "certificateAuthority": str,
            "cidr": str,
            "enableOutpost": bool,
            "id": str,
        },
        "containerd": {"config": str, "baseRuntimeSpec": dict},
        "instance": dict,
        "kubelet": {"config": dict, "flags": list},
        "featureGates": dict,
    },
}


def check_schema(value: Any, schema: Any, where: str = "") -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: not a mapping"
        for key, item in value.items():
            assert key in schema, f"{where}.{key}: not a NodeConfig field"
            check_schema(item, schema[key], f"{where}.{key}")
    else:
        assert isinstance(value, schema), f"{where}: {type(value).__name__}, not {schema}"


# nodeadm's base config for a containerd 1.7 node (version 2 keys), as its template writes it
NODEADM_V2_BASE = """\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
discard_unpacked_layers = true

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "localhost/kubernetes/pause"

[plugins."io.containerd.grpc.v1.cri".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = "/opt/cni/bin"
conf_dir = "/etc/cni/net.d"
"""

NODEADM_V3_BASE = """\
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[plugins.'io.containerd.cri.v1.images']
discard_unpacked_layers = true

[plugins.'io.containerd.cri.v1.images'.registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"
"""


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """nodeadm's merge: tables key by key, the user's values win."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def opts(**kw: Any) -> UserDataOptions:
    base: dict[str, Any] = {
        "ami": "al2023",
        "cluster": "demo",
        "bundle_url": "https://artifacts.example/sociable-0.1.0-x86_64.tar.gz",
        "bundle_sha256": "ab" * 32,
        "api_server_endpoint": "https://EXAMPLE.gr7.us-west-2.eks.amazonaws.com",
        "certificate_authority": CA,
        "cidr": "10.100.0.0/16",
    }
    return UserDataOptions(**{**base, **kw})


def parts(text: str) -> list[email.message.Message]:
    msg = email.message_from_string(text)
    assert msg.is_multipart() and msg.get_content_type() == "multipart/mixed"
    assert msg["MIME-Version"] == "1.0"
    return [p for p in msg.walk() if not p.is_multipart()]


def payload(part: email.message.Message) -> str:
    text = part.get_payload()
    assert isinstance(text, str)
    return text


def shellcheck(tmp_path: Path, script: str) -> None:
    assert shutil.which("shellcheck"), "shellcheck is missing (scripts/setup.sh installs it)"
    f = tmp_path / "script.sh"
    f.write_text(script)
    done = subprocess.run(["shellcheck", str(f)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def containerd_accepts(tmp_path: Path, text: str) -> str:
    """`containerd --config F config dump` of `text`; returns the dump."""
    assert shutil.which("containerd"), "containerd is missing (scripts/setup.sh installs it)"
    f = tmp_path / "containerd.toml"
    f.write_text(text)
    done = subprocess.run(
        ["containerd", "--config", str(f), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def config_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "merged.toml"
    f.write_text(text)
    ours = tmp_path / "sociable.toml"
    ours.write_text("")
    return subprocess.run(
        [
            *(sys.executable, "-m", "snapshotter.cli", "--config", str(ours)),
            *("config", "check", "--containerd-config", str(f)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_al2023_parts_as_cloud_init_sees_them() -> None:
    p = parts(user_data(opts(cri_proxy=True)))
    assert [x.get_content_type() for x in p] == [NODECONFIG_TYPE, "text/x-shellscript"]
    script = p[1].get_payload()
    assert isinstance(script, str) and script.startswith("#!/bin/bash\n")
    assert "--no-containerd-config --no-kubelet" in script
    assert "systemctl enable --now sociable-snapshotter.socket sociable-snapshotter.service" in (
        script
    )
    assert "sha256sum -c --quiet -" in script and "ab" * 32 in script
    assert "images import --snapshotter sociable --local /etc/eks/pause.tar" in script


def test_al2023_nodeconfig_fields_are_nodeadms() -> None:
    (node, _) = parts(user_data(opts(cri_proxy=True)))
    (doc,) = list(yaml.safe_load_all(payload(node)))
    check_schema(doc, NODECONFIG_SCHEMA)
    assert doc["apiVersion"] == NODECONFIG_API and doc["kind"] == "NodeConfig"
    assert doc["spec"]["cluster"] == {
        "name": "demo",
        "apiServerEndpoint": "https://EXAMPLE.gr7.us-west-2.eks.amazonaws.com",
        "certificateAuthority": CA,
        "cidr": "10.100.0.0/16",
    }
    assert doc["spec"]["kubelet"] == {"config": {"imageServiceEndpoint": ENDPOINT}}
    # without the CRI proxy kubelet is not touched
    (node, _) = parts(user_data(opts()))
    assert "kubelet" not in yaml.safe_load(payload(node))["spec"]


def _fragment(text: str) -> dict[str, Any]:
    (node, _) = parts(text)
    config = yaml.safe_load(payload(node))["spec"]["containerd"]["config"]
    assert "version" not in tomllib.loads(config)
    return tomllib.loads(config)


def test_al2023_containerd_17_toml_runs_on_real_containerd_and_passes_check(
    tmp_path: Path,
) -> None:
    frag = _fragment(user_data(opts(containerd_version=V(1, 7, 27), mirror=True)))
    cri = frag["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {
        "snapshotter": "sociable",
        "disable_snapshot_annotations": False,
        "discard_unpacked_layers": False,
    }
    merged = tomlkit.dumps(deep_merge(tomllib.loads(NODEADM_V2_BASE), frag))
    dump = containerd_accepts(tmp_path, merged)
    assert 'snapshotter = "sociable"' in dump
    assert 'address = "/run/sociable/sociable.sock"' in dump
    assert "discard_unpacked_layers = false" in dump
    check = config_check(tmp_path, merged)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok: config and" in check.stdout


def test_al2023_containerd_2_toml_has_version_3_keys_and_passes_check(tmp_path: Path) -> None:
    frag = _fragment(user_data(opts()))
    assert frag["plugins"]["io.containerd.cri.v1.images"] == {
        "snapshotter": "sociable",
        "disable_snapshot_annotations": False,
    }
    assert frag["proxy_plugins"]["sociable"]["exports"] == {"root": "/var/lib/sociable"}
    merged = tomlkit.dumps(deep_merge(tomllib.loads(NODEADM_V3_BASE), frag))
    check = config_check(tmp_path, merged)
    assert check.returncode == 0, check.stdout + check.stderr
    # the AMI's own discard_unpacked_layers stays without --mirror
    assert tomllib.loads(merged)["plugins"]["io.containerd.cri.v1.images"][
        "discard_unpacked_layers"
    ]


def test_al2023_shell_part_is_shellcheck_clean(tmp_path: Path) -> None:
    (_, shell) = parts(user_data(opts(cri_proxy=True, mirror=True, peers_dns="peers.example")))
    script = shell.get_payload()
    assert isinstance(script, str)
    assert "mirror configure --default --hosts-dir /etc/containerd/certs.d" in script
    shellcheck(tmp_path, script)


def test_al2_script_installs_into_the_template_and_bootstraps(tmp_path: Path) -> None:
    script = user_data(
        opts(
            ami="al2",
            cidr="",
            dns_cluster_ip="10.100.0.10",
            cri_proxy=True,
            kubelet_extra_args="--max-pods=20",
        )
    )
    assert script.startswith("#!/bin/bash\n")
    assert (
        '"$bundle/install.sh" --no-kubelet --containerd-config '
        "/etc/eks/containerd/containerd-config.toml\n"
    ) in script
    last = script.rstrip("\n").splitlines()[-1]
    assert last == (
        f"/etc/eks/bootstrap.sh demo --b64-cluster-ca {CA} --apiserver-endpoint "
        "https://EXAMPLE.gr7.us-west-2.eks.amazonaws.com --dns-cluster-ip 10.100.0.10 "
        f"--kubelet-extra-args '--max-pods=20 --image-service-endpoint={ENDPOINT}'"
    )
    shellcheck(tmp_path, script)
    (only,) = parts(user_data(opts(ami="al2", mime=True)))
    assert only.get_content_type() == "text/x-shellscript"


def test_daemon_config_loads_with_ecr_providers(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    ud = opts(cri_proxy=True, mirror=True, peers_dns="p.example")
    f.write_text(daemon_config(ud, node_ip="10.0.3.7"))
    cfg = load(f)
    assert cfg.credential_providers.config == "/etc/eks/image-credential-provider/config.json"
    assert cfg.credential_providers.bin_dir == "/etc/eks/image-credential-provider"
    assert cfg.cri.enable and cfg.peers.enable and cfg.mirror.enable
    assert cfg.peers.dns == "p.example"
    assert cfg.peers.advertise == "10.0.3.7:8472"


def test_install_sh_is_shellcheck_clean(tmp_path: Path) -> None:
    shellcheck(tmp_path, INSTALL_SH)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"cluster": "bad name"}, "--cluster"),
        ({"bundle_url": "file:///x"}, "--bundle-url"),
        ({"bundle_sha256": "xyz"}, "--bundle-sha256"),
        ({"containerd_version": V(1, 6, 36)}, "--containerd-version"),
    ],
)
def test_bad_options_are_usage_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        user_data(opts(**kw))
