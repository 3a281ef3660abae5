"""`install.sh` from a `make dist` bundle on a node tree (`--prefix`), then the real thing:
containerd 1.6 started with the config.toml install merged, the daemon started from the venv
install made, an indexed image pulled through the daemon's CRI proxy (which kubelet's config,
as install left it, names) and mounted lazily, a container reading a file of it. Then
`install` again changes nothing, and `uninstall` gives every file back byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from snapshotter.mountinfo import mounts_under
from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    ContainerdPaths,
    CriImageClient,
    PushedImages,
    require_containerd,
    write_certs_d,
)
from tests.support.nodeinstall import (
    run_containerd,
    run_installed_daemon,
    unpack_bundle,
    wheelhouse,  # noqa: F401 - the session fixture
)
from tests.support.registry import RegistryServer

pytestmark = [pytest.mark.root, pytest.mark.slow]

K8S = "k8s.io"
BLOB = bytes(b for i in range(2000) for b in hashlib.sha256(str(i).encode()).digest() * 8)
"""512 000 bytes that do not compress: the layer holding them is indexed."""


def tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {p.readlink()}"
        elif p.is_dir():
            out[rel] = ("dir", p.stat().st_mode & 0o7777)
        else:
            out[rel] = (p.read_bytes(), p.stat().st_mode & 0o7777)
    return out


def containerd_config(paths: ContainerdPaths, sandbox: str, imports: Path) -> str:
    """A node's containerd config: comments, the node's own settings, an import glob."""
    return f"""\
version = 2
# This node's containerd: its own directories and socket.
root = "{paths.root}"
state = "{paths.state}"
imports = ["{imports}/*.toml"]

[grpc]
  address = "{paths.address}"

[ttrpc]
  address = "{paths.address}.ttrpc"

[metrics]
  address = ""  # off

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{paths.base / "opt"}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{sandbox}"
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      discard_unpacked_layers = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{paths.cni_conf}"
    # hosts.toml per registry
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{paths.certs_d}"
"""


KUBELET = """\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
"""


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "PYTHON": sys.executable},
        check=False,
    )
    assert done.returncode == 0, (
        f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr}"
    )
    return done


def test_install_run_lazily_install_again_uninstall(
    registry: RegistryServer,
    pushed_images: PushedImages,
    wheelhouse: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    require_containerd()
    ref = f"{registry.host}/install/app:v1-soci"
    layout = images.write_oci_layout(
        tmp_path / "image",
        [images.busybox_layer(), [images.File(path="data/blob", data=BLOB)]],
        tag="v1",
    )
    sociable(
        "convert",
        "--min-layer-size",
        "100000",
        f"oci-layout:{layout.layout}:v1",
        ref,
        root=tmp_path / "convert-root",
    )
    bundle = unpack_bundle(wheelhouse, tmp_path / "dist")

    node = tmp_path / "node"
    state = tmp_path / "sociable"
    paths = ContainerdPaths(tmp_path / "containerd")
    write_certs_d(paths.certs_d, [registry.host])
    imports = tmp_path / "containerd.d"
    imports.mkdir()
    (node / "etc/containerd").mkdir(parents=True)
    ctd_config = node / "etc/containerd/config.toml"
    ctd_config.write_text(containerd_config(paths, pushed_images.pause_ref, imports))
    (node / "etc/sociable").mkdir(parents=True)
    config = node / "etc/sociable/config.toml"
    config.write_text(
        f'[daemon]\naddress = "{state}/sociable.sock"\nroot = "{state}/root"\n\n'
        '[remote]\nhosts_dir = ""\n\n'
        f'[cri]\nenable = true\naddress = "{state}/cri.sock"\n'
        f'containerd_address = "{paths.address}"\n'
    )
    (node / "var/lib/kubelet").mkdir(parents=True)
    (node / "var/lib/kubelet/config.yaml").write_text(KUBELET)
    before = tree(node)

    dry = run([str(bundle / "install.sh"), "--prefix", str(node), "--dry-run"])
    assert f"+++ {ctd_config}" in dry.stdout
    assert "would create the virtual environment" in dry.stdout
    assert tree(node) == before

    first = run([str(bundle / "install.sh"), "--prefix", str(node)])
    assert "installed sociable" in first.stdout
    assert "imports" in first.stderr  # the drop-in warning
    merged = ctd_config.read_text()
    assert "# This node's containerd: its own directories and socket." in merged
    assert "discard_unpacked_layers = true" in merged
    assert f'config_path = "{paths.certs_d}"' in merged  # kept
    assert (node / "etc/containerd/config.toml.pre-sociable").read_bytes() == (
        before["etc/containerd/config.toml"][0]  # type: ignore[index]
    )
    endpoint = f"unix://{state}/cri.sock"
    assert (node / "var/lib/kubelet/config.yaml").read_text() == (
        KUBELET + f"imageServiceEndpoint: {endpoint}\n"
    )
    program = node / "usr/local/bin/sociable-snapshotter"
    assert program.resolve().is_relative_to(node / "opt/sociable")
    installed = tree(node)

    check = run(
        [
            *(str(program), "--config", str(config), "config", "check"),
            *("--containerd-config", str(ctd_config)),
        ]
    )
    assert check.stdout.endswith("\n") and "ok: config and" in check.stdout

    with (
        run_installed_daemon(program, config, state) as daemon,
        run_containerd(
            paths, ctd_config, proxy_name="sociable", registry_hosts=(registry.host,)
        ) as ctd,
    ):
        # kubelet's path: the image service it is configured with is the proxy
        channel = grpc.insecure_channel(endpoint)
        try:
            CriImageClient(channel).pull_image(ref)
        finally:
            channel.close()
        lazy = [
            m.mountpoint
            for m in mounts_under((state / "root").resolve())
            if str(m.mountpoint).endswith("/fs")
        ]
        assert lazy, f"no lazy layer mounted\n{daemon.log_tail()}"
        out = ctd.run(ref, "installed-1", "sha256sum", "/data/blob", namespace=K8S)
        assert out.split()[0] == hashlib.sha256(BLOB).hexdigest()
        assert daemon.proc.poll() is None

    again = run([str(bundle / "install.sh"), "--prefix", str(node)])
    assert "nothing to do" in again.stdout
    assert tree(node) == installed

    gone = run([str(program), "uninstall", "--prefix", str(node)])
    assert f"restored {ctd_config}" in gone.stdout
    assert tree(node) == before
