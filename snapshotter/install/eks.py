"""EKS node launch user data that installs sociable before containerd and kubelet start
(docs/eks.md).

- **AL2023** (nodeadm): a MIME multi-part archive. Its `application/node.eks.aws` part is a
  `NodeConfig` (`node.eks.aws/v1alpha1`) whose `spec.containerd.config` nodeadm merges into
  its own containerd config (our proxy plugin and CRI settings: version 3 keys for the
  containerd 2.x AMIs, version 2 keys with `--containerd-version 1.7.x`) and, with the CRI
  proxy, `spec.kubelet.config.imageServiceEndpoint`. Its `text/x-shellscript` part runs in
  cloud-init, after nodeadm wrote the configs and before `nodeadm-run` (re)starts containerd
  and kubelet: it installs the bundle (`install.sh --no-containerd-config --no-kubelet`, so
  nodeadm stays the one writer of those files), starts the snapshotter (containerd's drop-in
  orders containerd after it) and re-imports the AMI's cached pause image into our
  snapshotter before kubelet starts.
- **AL2** (`/etc/eks/bootstrap.sh`): a shell script (`--mime` wraps it for a managed node
  group's launch template) that installs the bundle with the install command merging into
  the template bootstrap.sh copies to `/etc/containerd/config.toml`
  (`/etc/eks/containerd/containerd-config.toml`), then calls bootstrap.sh, with the CRI
  proxy's `--image-service-endpoint` in `--kubelet-extra-args`. The AMI's
  `sandbox-image.service` then pulls the pause image through CRI, into our snapshotter.

Every node's daemon gets kubelet's ECR credential provider (`[credential_providers]`), so
private ECR images are read lazily with the node's role. `--mirror` turns on the peers and
the registry mirror, keeps unpacked layers in containerd's content store
(`discard_unpacked_layers = false`) and writes the `_default` hosts.toml.
"""

from __future__ import annotations

import email.message
import email.policy
import re
import shlex
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from typing import Any, Final, Literal

import yaml

from ..config import Config
from ..configcheck import ContainerdVersion
from ..errors import UsageError
from .containerd import OurSettings, fragment

NODECONFIG_API: Final = "node.eks.aws/v1alpha1"
NODECONFIG_TYPE: Final = "application/node.eks.aws"
SHELL_TYPE: Final = "text/x-shellscript"
BOUNDARY: Final = "//sociable-user-data//"
ECR_PROVIDER_CONFIG: Final = "/etc/eks/image-credential-provider/config.json"
ECR_PROVIDER_BIN_DIR: Final = "/etc/eks/image-credential-provider"
AL2_CONTAINERD_TEMPLATE: Final = "/etc/eks/containerd/containerd-config.toml"
PAUSE_TAR: Final = "/etc/eks/pause.tar"
HOSTS_DIR: Final = "/etc/containerd/certs.d"
PAUSE_UNIT: Final = "sociable-pause-import.service"
Ami = Literal["al2023", "al2"]


@dataclass(frozen=True, slots=True)
class UserDataOptions:
    ami: Ami
    cluster: str
    bundle_url: str
    bundle_sha256: str = ""
    api_server_endpoint: str = ""
    certificate_authority: str = ""
    cidr: str = ""
    dns_cluster_ip: str = ""
    containerd_version: ContainerdVersion | None = None
    """AL2023: default 2.1.0 (its AMIs' default); AL2: None, install asks the node's."""
    cri_proxy: bool = False
    mirror: bool = False
    peers_dns: str = ""
    python: str = "python3.11"
    kubelet_extra_args: str = ""
    mime: bool = False

    @property
    def containerd(self) -> ContainerdVersion:
        if self.containerd_version is not None:
            return self.containerd_version
        return ContainerdVersion(2, 1, 0) if self.ami == "al2023" else ContainerdVersion(1, 7, 0)


def _check(opts: UserDataOptions) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", opts.cluster):
        raise UsageError(f"--cluster {opts.cluster!r} is not an EKS cluster name")
    if not re.match(r"https?://", opts.bundle_url):
        raise UsageError(f"--bundle-url {opts.bundle_url!r}: give an http(s):// URL")
    if opts.bundle_sha256 and not re.fullmatch(r"[0-9a-f]{64}", opts.bundle_sha256):
        raise UsageError("--bundle-sha256: 64 lowercase hex digits")
    if opts.ami == "al2023" and opts.containerd < (1, 7):
        raise UsageError("--containerd-version: AL2023 AMIs have containerd 1.7 or 2.x")


PEER_PORT: Final = 8472
NODE_IP_SHELL: Final = "${node_ip}"
"""The node's address in the script (`ip route get`): peers advertise it to each other."""


def daemon_config(opts: UserDataOptions, *, node_ip: str = NODE_IP_SHELL) -> str:
    """`/etc/sociable/config.toml` for an EKS node (`node_ip`: the address other nodes reach
    this one at, with `--mirror`)."""
    lines = [
        "# Written by the EKS user data (docs/eks.md).",
        "[credential_providers]",
        f'config = "{ECR_PROVIDER_CONFIG}"',
        f'bin_dir = "{ECR_PROVIDER_BIN_DIR}"',
    ]
    if opts.cri_proxy:
        lines += ["", "[cri]", "enable = true"]
    if opts.mirror:
        lines += ["", "[peers]", "enable = true", f'advertise = "{node_ip}:{PEER_PORT}"']
        if opts.peers_dns:
            lines.append(f'dns = "{opts.peers_dns}"')
        lines += ["", "[mirror]", "enable = true"]
    return "\n".join(lines) + "\n"


def containerd_fragment(opts: UserDataOptions) -> str:
    """The TOML nodeadm merges into its containerd config (no `version` line: nodeadm picks
    the template by the keys; its template sets `registry.config_path`)."""
    ours = OurSettings.of(Config())
    ours = OurSettings(ours.plugin_name, ours.address, ours.root, mirror=opts.mirror)
    return fragment(opts.containerd, ours, registry=False)


def _endpoint() -> str:
    return f"unix://{Config().cri.address}"


def nodeconfig(opts: UserDataOptions) -> dict[str, Any]:
    cluster: dict[str, Any] = {"name": opts.cluster}
    if opts.api_server_endpoint:
        cluster["apiServerEndpoint"] = opts.api_server_endpoint
    if opts.certificate_authority:
        cluster["certificateAuthority"] = opts.certificate_authority
    if opts.cidr:
        cluster["cidr"] = opts.cidr
    spec: dict[str, Any] = {
        "cluster": cluster,
        "containerd": {"config": containerd_fragment(opts)},
    }
    if opts.cri_proxy:
        spec["kubelet"] = {"config": {"imageServiceEndpoint": _endpoint()}}
    return {"apiVersion": NODECONFIG_API, "kind": "NodeConfig", "spec": spec}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the containerd TOML) as YAML literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def nodeconfig_yaml(opts: UserDataOptions) -> str:
    return "---\n" + yaml.dump(nodeconfig(opts), Dumper=_BlockDumper, sort_keys=False)


def _q(value: str) -> str:
    return shlex.quote(value)


def _fetch_lines(opts: UserDataOptions, package_manager: str) -> list[str]:
    """Shell lines: the runtime packages, then the bundle downloaded, checked, unpacked into
    "$bundle"."""
    lines = [
        f"PYTHON={_q(opts.python)}",
        f"BUNDLE_URL={_q(opts.bundle_url)}",
        f"BUNDLE_SHA256={_q(opts.bundle_sha256)}",
        "",
    ]
    if package_manager == "dnf":  # AL2023 has both packages
        lines += [
            'if ! command -v "$PYTHON" >/dev/null; then dnf install -y "$PYTHON"; fi',
            "if ! command -v fusermount3 >/dev/null; then dnf install -y fuse3; fi",
        ]
    else:  # without fuse3 no layer is lazy, but the node joins: a warning, not a failure
        lines += [
            "if ! command -v fusermount3 >/dev/null; then",
            f'  {package_manager} install -y fuse3 || echo "sociable: no fuse3: no lazy layers" >&2',
            "fi",
        ]
    lines += [
        'if ! command -v "$PYTHON" >/dev/null; then',
        '  echo "sociable: $PYTHON (Python 3.11+) is missing" >&2',
        "  exit 1",
        "fi",
        'work="$(mktemp -d)"',
        "trap 'rm -rf \"$work\"' EXIT",
        'curl -fsSL --retry 5 -o "$work/sociable.tar.gz" "$BUNDLE_URL"',
        'if [ -n "$BUNDLE_SHA256" ]; then',
        '  echo "$BUNDLE_SHA256  $work/sociable.tar.gz" | sha256sum -c --quiet -',
        "fi",
        'bundle="$work/bundle"',
        'mkdir -p "$bundle"',
        'tar -xzf "$work/sociable.tar.gz" -C "$bundle" --strip-components=1',
        "",
        "mkdir -p /etc/sociable",
        *(
            ["node_ip=\"$(ip -4 route get 1.1.1.1 | sed -n 's/.* src \\([0-9.]*\\).*/\\1/p')\""]
            if opts.mirror
            else []
        ),
        "if [ ! -e /etc/sociable/config.toml ]; then",
        "  cat >/etc/sociable/config.toml <<SOCIABLE_CONFIG",
        daemon_config(opts).rstrip("\n"),
        "SOCIABLE_CONFIG",
        "fi",
    ]
    return lines


def _start_lines(opts: UserDataOptions) -> list[str]:
    lines = [
        "systemctl daemon-reload",
        "systemctl enable --now sociable-snapshotter.socket sociable-snapshotter.service",
    ]
    if opts.mirror:
        lines.append(
            f"/usr/local/bin/sociable-snapshotter mirror configure --default --hosts-dir {HOSTS_DIR}"
        )
    return lines


def _pause_unit(opts: UserDataOptions) -> str:
    local = " --local" if opts.containerd >= (2, 0) else ""
    return (
        "[Unit]\n"
        "Description=Import the AMI's cached pause image into the sociable snapshotter\n"
        f"ConditionPathExists={PAUSE_TAR}\n"
        "Requires=containerd.service\n"
        "After=containerd.service sociable-snapshotter.service\n"
        "Before=kubelet.service\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        "ExecStart=/usr/bin/ctr --namespace k8s.io images import --snapshotter sociable"
        f"{local} {PAUSE_TAR}\n"
    )


def al2023_script(opts: UserDataOptions) -> str:
    """The shell part of the AL2023 user data."""
    lines = [
        "#!/bin/bash",
        "# sociable: runs in cloud-init, after nodeadm wrote the configs and before nodeadm-run",
        "# (re)starts containerd and kubelet.",
        "set -euo pipefail",
        "",
        *_fetch_lines(opts, "dnf"),
        "",
        '"$PYTHON" --version',
        'PYTHON="$PYTHON" "$bundle/install.sh" --no-containerd-config --no-kubelet',
        "",
        "# containerd pulled the pause image into overlayfs when the AMI was built: import it",
        "# into this snapshotter before kubelet starts its first pod.",
        f"cat >/etc/systemd/system/{PAUSE_UNIT} <<'SOCIABLE_UNIT'",
        _pause_unit(opts).rstrip("\n"),
        "SOCIABLE_UNIT",
        "mkdir -p /etc/systemd/system/kubelet.service.d",
        "printf '[Unit]\\nWants=%s\\nAfter=%s\\n' "
        f"{PAUSE_UNIT} {PAUSE_UNIT} >/etc/systemd/system/kubelet.service.d/10-sociable.conf",
        *_start_lines(opts),
        f"systemctl enable {PAUSE_UNIT}",
    ]
    return "\n".join(lines) + "\n"


def al2_script(opts: UserDataOptions) -> str:
    """The AL2 user data script: install, then bootstrap.sh."""
    extra = opts.kubelet_extra_args.split()
    if opts.cri_proxy:
        extra.append(f"--image-service-endpoint={_endpoint()}")
    bootstrap = ["/etc/eks/bootstrap.sh", _q(opts.cluster)]
    for flag, value in (
        ("--b64-cluster-ca", opts.certificate_authority),
        ("--apiserver-endpoint", opts.api_server_endpoint),
        ("--dns-cluster-ip", opts.dns_cluster_ip),
        ("--kubelet-extra-args", " ".join(extra)),
    ):
        if value:
            bootstrap += [flag, _q(value)]
    v = opts.containerd_version
    version = f" --containerd-version {v.major}.{v.minor}.{v.patch}" if v else ""
    lines = [
        "#!/bin/bash",
        "# sociable: install, merge containerd's settings into the template bootstrap.sh copies",
        "# to /etc/containerd/config.toml, then join the cluster.",
        "set -euo pipefail",
        "",
        *_fetch_lines(opts, "yum"),
        "",
        'PYTHON="$PYTHON" "$bundle/install.sh" --no-kubelet '
        f"--containerd-config {AL2_CONTAINERD_TEMPLATE}{version}",
        *_start_lines(opts),
        "",
        " ".join(bootstrap),
    ]
    return "\n".join(lines) + "\n"


def _part(content_type: str, body: str) -> email.message.Message:
    part = email.message.Message()
    part["Content-Type"] = content_type
    part.set_payload(body, charset=None)
    return part


def _mime(parts: list[email.message.Message]) -> str:
    msg = MIMEMultipart("mixed", boundary=BOUNDARY)
    for p in parts:
        msg.attach(p)
    text = msg.as_string(policy=email.policy.compat32.clone(linesep="\n"))
    return text if text.endswith("\n") else text + "\n"


def user_data(opts: UserDataOptions) -> str:
    """The user data for `opts.ami`. Raises UsageError on a bad option."""
    _check(opts)
    if opts.ami == "al2023":
        return _mime(
            [
                _part(NODECONFIG_TYPE, nodeconfig_yaml(opts)),
                _part(f'{SHELL_TYPE}; charset="us-ascii"', al2023_script(opts)),
            ]
        )
    script = al2_script(opts)
    if opts.mime:
        return _mime([_part(f'{SHELL_TYPE}; charset="us-ascii"', script)])
    return script


__all__ = [
    "BOUNDARY",
    "NODECONFIG_API",
    "NODECONFIG_TYPE",
    "SHELL_TYPE",
    "UserDataOptions",
    "al2023_script",
    "al2_script",
    "containerd_fragment",
    "daemon_config",
    "nodeconfig",
    "nodeconfig_yaml",
    "user_data",
]
