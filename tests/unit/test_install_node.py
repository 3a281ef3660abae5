"""`install` and `uninstall` on a node tree under `--prefix`: every file, link and directory,
with the venv build (pip) replaced by a fake at its seam. The real venv, containerd and daemon
are in tests/integration/test_install.py."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from snapshotter import cli
from snapshotter.config import Config, CriConfig
from snapshotter.configcheck import ContainerdVersion as V
from snapshotter.errors import UsageError
from snapshotter.install import __main__ as install_main
from snapshotter.install import venv as venv_mod
from snapshotter.install.command import parse_version
from snapshotter.install.installer import (
    InstallOptions,
    apply_install,
    apply_uninstall,
    plan_install,
    plan_uninstall,
    print_dry_run,
)
from snapshotter.install.kubelet import plan_kubelet
from snapshotter.install.layout import Layout
from snapshotter.install.manifest import Manifest, ManifestError
from snapshotter.install.units import InstallError, check_unit

REPO = Path(__file__).resolve().parents[2]

CONTAINERD = """\
version = 2
# the node's own settings
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"  # pinned
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
"""

KUBEADM = """\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# kubeadm wrote this
cgroupDriver: systemd
"""

EKS_JSON = '{\n    "kind": "KubeletConfiguration",\n    "maxPods": 17\n}\n'


def tree(root: Path) -> dict[str, object]:
    """Every path under `root`: bytes of files, `-> target` of links, `dir` of directories
    (with their modes)."""
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


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A bundle: a wheelhouse (a stand-in wheel), systemd/ and docs/ from the checkout."""
    b = tmp_path / "bundle"
    (b / "wheelhouse").mkdir(parents=True)
    (b / "wheelhouse" / "sociable-0.1.0-py3-none-any.whl").write_bytes(b"wheel v1")
    (b / "wheelhouse" / "tomlkit-0.13.0-py3-none-any.whl").write_bytes(b"dep")
    shutil.copytree(REPO / "systemd", b / "systemd")
    shutil.copytree(REPO / "docs", b / "docs")
    return b


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str, bool]]:
    """The venv builder replaced: records (venv, wheel, fresh) and makes bin/ programs."""
    calls: list[tuple[Path, str, bool]] = []

    def build(venv: Path, wheelhouse: venv_mod.Wheelhouse, *, fresh: bool) -> None:
        calls.append((venv, wheelhouse.wheel.name, fresh))
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        for name in ("python", "sociable-snapshotter", "sociable"):
            (venv / "bin" / name).write_text(f"# {wheelhouse.wheel.read_text()}\n")

    monkeypatch.setattr(venv_mod, "build", build)
    return calls


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node tree: containerd's config, kubeadm's kubelet config, our config with [cri]."""
    n = tmp_path / "node"
    (n / "etc/containerd").mkdir(parents=True)
    (n / "etc/containerd/config.toml").write_text(CONTAINERD)
    (n / "etc/containerd/config.toml").chmod(0o600)
    (n / "var/lib/kubelet").mkdir(parents=True)
    (n / "var/lib/kubelet/config.yaml").write_text(KUBEADM)
    (n / "etc/sociable").mkdir(parents=True)
    (n / "etc/sociable/config.toml").write_text("[cri]\nenable = true\n")
    return n


def _install(node: Path, bundle: Path, **kw: object) -> tuple[str, InstallOptions]:
    settings: dict[str, object] = {"containerd_version": V(1, 6, 20), **kw}
    opts = InstallOptions(prefix=node, wheelhouse=bundle / "wheelhouse", **settings)  # type: ignore[arg-type]
    plan = plan_install(opts)
    out = io.StringIO()
    if plan.nothing_to_do:
        return "nothing to do", opts
    apply_install(plan, now=False, out=out)
    return out.getvalue(), opts


def test_install_again_nothing_then_uninstall_restores_every_byte(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    before = tree(node)
    out, _ = _install(node, bundle)
    assert "updated" in out and "created" in out
    assert builds == [(node / "opt/sociable", "sociable-0.1.0-py3-none-any.whl", True)]
    # what install wrote
    ctd = (node / "etc/containerd/config.toml").read_text()
    assert 'snapshotter = "sociable"' in ctd and "# the node's own settings" in ctd
    assert (node / "etc/containerd/config.toml").stat().st_mode & 0o777 == 0o600
    assert (node / "etc/containerd/config.toml.pre-sociable").read_text() == CONTAINERD
    kubelet = (node / "var/lib/kubelet/config.yaml").read_text()
    assert kubelet == KUBEADM + "imageServiceEndpoint: unix:///run/sociable/cri.sock\n"
    for unit in (REPO / "systemd").glob("*.s*"):
        assert (node / "etc/systemd/system" / unit.name).read_bytes() == unit.read_bytes()
    assert (node / "usr/share/doc/sociable/configuration.md").is_file()
    assert (node / "etc/systemd/system/containerd.service.d/10-sociable.conf").is_file()
    link = node / "usr/local/bin/sociable-snapshotter"
    assert link.readlink() == node / "opt/sociable/bin/sociable-snapshotter"
    assert (node / "etc/sociable/config.toml").read_text() == "[cri]\nenable = true\n"
    manifest = json.loads((node / "etc/sociable/install.json").read_text())
    assert {"path": "/etc/containerd/config.toml", "created": False}.items() <= next(
        f for f in manifest["files"] if f["path"] == "/etc/containerd/config.toml"
    ).items()
    after_install = tree(node)

    again, _ = _install(node, bundle)
    assert again == "nothing to do"
    assert tree(node) == after_install
    assert len(builds) == 1

    plan = plan_uninstall(node, purge=False)
    apply_uninstall(plan, io.StringIO())
    assert tree(node) == before


def test_dry_run_writes_nothing_and_shows_diffs(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    before = tree(node)
    plan = plan_install(
        InstallOptions(prefix=node, wheelhouse=bundle / "wheelhouse", containerd_version=V(1, 6, 0))
    )
    out = io.StringIO()
    print_dry_run(plan, out)
    text = out.getvalue()
    assert f"--- {node}/etc/containerd/config.toml" in text
    assert '+    snapshotter = "sociable"' in text or '+snapshotter = "sociable"' in text
    assert f"+++ {node}/etc/systemd/system/sociable-snapshotter.service" in text
    assert "would create the virtual environment" in text
    assert tree(node) == before and builds == []


def test_a_new_wheel_upgrades_the_venv_and_keeps_the_original_backup(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    _install(node, bundle)
    (bundle / "wheelhouse" / "sociable-0.1.0-py3-none-any.whl").write_bytes(b"wheel v2")
    _install(node, bundle)
    assert builds[-1] == (node / "opt/sociable", "sociable-0.1.0-py3-none-any.whl", False)
    assert (node / "etc/containerd/config.toml.pre-sociable").read_text() == CONTAINERD
    apply_uninstall(plan_uninstall(node, purge=False), io.StringIO())
    assert (node / "etc/containerd/config.toml").read_text() == CONTAINERD
    assert not (node / "opt").exists()


def test_files_edited_after_install_are_kept(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    (node / "etc/sociable/config.toml").unlink()
    _install(node, bundle)
    assert (node / "etc/sociable/config.toml").read_text().startswith("# sociable-snapshotter")
    edited_ctd = (node / "etc/containerd/config.toml").read_text() + "# an operator's note\n"
    (node / "etc/containerd/config.toml").write_text(edited_ctd)
    (node / "etc/sociable/config.toml").write_text("[remote]\nenable = false\n")
    plan = plan_uninstall(node, purge=False)
    apply_uninstall(plan, io.StringIO())
    assert (node / "etc/containerd/config.toml").read_text() == CONTAINERD
    assert (node / "etc/containerd/config.toml.sociable-edited").read_text() == edited_ctd
    assert (node / "etc/sociable/config.toml").read_text() == "[remote]\nenable = false\n"
    assert any("edited since install" in n for n in plan.notes)


def test_absent_containerd_config_is_created_then_removed(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    shutil.rmtree(node / "etc/containerd")
    before = tree(node)
    _install(node, bundle, containerd_version=V(2, 1, 0))
    text = (node / "etc/containerd/config.toml").read_text()
    assert text.startswith("version = 3")
    apply_uninstall(plan_uninstall(node, purge=False), io.StringIO())
    assert tree(node) == before


def test_no_containerd_config_and_no_kubelet_leave_them_alone(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    plan = plan_install(
        InstallOptions(
            prefix=node,
            wheelhouse=bundle / "wheelhouse",
            containerd=False,
            kubelet=False,
        )
    )
    paths = {c.path for c in plan.changes}
    assert node / "etc/containerd/config.toml" not in paths
    assert node / "var/lib/kubelet/config.yaml" not in paths
    # the ordering drop-in is written all the same
    assert node / "etc/systemd/system/containerd.service.d/10-sociable.conf" in paths


def test_uninstall_without_manifest_and_purge(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    assert plan_uninstall(node, purge=False).manifest is None
    (node / "etc/sociable/config.toml").write_text('[daemon]\nroot = "/var/lib/sociable"\n')
    _install(node, bundle)
    (node / "var/lib/sociable/snapshots").mkdir(parents=True)
    plan = plan_uninstall(node, purge=True)
    assert plan.purge == node / "var/lib/sociable"
    apply_uninstall(plan, io.StringIO())
    assert not (node / "var/lib/sociable").exists()
    assert not (node / "etc/sociable/install.json").exists()
    # the config was there before install: it stays
    assert (node / "etc/sociable/config.toml").read_text().startswith("[daemon]")


def test_a_program_in_the_way_is_refused(
    node: Path, bundle: Path, builds: list[tuple[Path, str, bool]]
) -> None:
    (node / "usr/local/bin").mkdir(parents=True)
    (node / "usr/local/bin/sociable").write_text("#!/bin/sh\n")
    with pytest.raises(InstallError, match="is not a link into"):
        plan_install(
            InstallOptions(
                prefix=node, wheelhouse=bundle / "wheelhouse", containerd_version=V(1, 6, 0)
            )
        )


def test_wheelhouse_needs_exactly_one_wheel_of_ours(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="not a directory"):
        venv_mod.Wheelhouse.open(tmp_path / "none")
    with pytest.raises(InstallError, match=r"exactly one sociable wheel \(none\)"):
        venv_mod.Wheelhouse.open(tmp_path)


def test_units_must_run_and_document_what_install_puts_there() -> None:
    docs = {Path("/usr/share/doc/sociable/configuration.md")}
    ok = "[Unit]\nDocumentation=file:///usr/share/doc/sociable/configuration.md\n"
    check_unit("a.socket", ok, docs)  # type: ignore[arg-type]
    with pytest.raises(InstallError, match="ExecStart runs /usr/bin/sociable-snapshotter"):
        check_unit("a.service", "[Service]\nExecStart=/usr/bin/sociable-snapshotter\n", set())
    with pytest.raises(InstallError, match=r"Documentation /usr/share/doc/x\.md is not installed"):
        check_unit("a.service", "[Unit]\nDocumentation=file:///usr/share/doc/x.md man:x\n", set())


def test_kubelet_json_dropin_and_nothing(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    cri = Config(cri=CriConfig(enable=True))
    assert plan_kubelet(layout, Config()).notes == ("kubelet left alone: [cri] enable is false",)
    assert "no kubelet config found" in plan_kubelet(layout, cri).notes[0]
    dropin = tmp_path / "etc/systemd/system/kubelet.service.d/30-kubelet-extra-args.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\nEnvironment='KUBELET_EXTRA_ARGS=--max-pods=20'\n")
    (change,) = plan_kubelet(layout, cri).changes
    assert change.new == (
        b"[Service]\nEnvironment='KUBELET_EXTRA_ARGS=--max-pods=20 "
        b"--image-service-endpoint=unix:///run/sociable/cri.sock'\n"
    )
    eks = tmp_path / "etc/kubernetes/kubelet/kubelet-config.json"
    eks.parent.mkdir(parents=True)
    eks.write_text(EKS_JSON)
    (change,) = plan_kubelet(layout, cri).changes
    assert change.new.decode() == (
        '{\n    "kind": "KubeletConfiguration",\n    "maxPods": 17,\n'
        '    "imageServiceEndpoint": "unix:///run/sociable/cri.sock"\n}\n'
    )
    eks.write_bytes(change.new)
    assert plan_kubelet(layout, cri).changes == ()


def test_manifest_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not an install manifest"):
        Manifest.from_json(b'{"files": []}', tmp_path / "m.json")
    m = Manifest(version="0.1.0", dirs=("/opt",))
    assert Manifest.from_json(m.to_json(), tmp_path) == m


def test_version_flag_and_exit_codes_match_the_cli() -> None:
    assert parse_version("1.7.27") == V(1, 7, 27)
    assert parse_version("v2.1") == V(2, 1, 0)
    assert parse_version("2.0.0-rc.1") == V(2, 0, 0, prerelease=True)
    for bad in ("latest", "1", "1.7.27 x"):
        with pytest.raises(UsageError, match=r"MAJOR\.MINOR\.PATCH"):
            parse_version(bad)
    table = dict(cli.EXIT_CODES)
    for cls, code in install_main.EXIT_CODES:
        assert table[cls] == code, cls


def test_install_command_needs_only_the_standard_library_and_tomlkit(tmp_path: Path) -> None:
    """What a bundle's install.sh relies on: no daemon dependency is imported."""
    import subprocess
    import sys

    import tomlkit

    shutil.copytree(Path(tomlkit.__file__).parent, tmp_path / "tomlkit")
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; "
        "import snapshotter.install.__main__, snapshotter.install.bundle; "
        "bad = {'trio', 'grpc', 'httpx', 'yaml'} & set(sys.modules); "
        "sys.exit(f'imported {sorted(bad)}' if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(REPO), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
