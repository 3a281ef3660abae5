"""kubelet's image-service endpoint pointed at the CRI proxy (`[cri] enable`), where kubelet
is configured by a file this node has.

In order, the first that exists is changed: a kubelet config file (`KUBELET_CONFIGS`, the
`imageServiceEndpoint` field: JSON on EKS AMIs, YAML with kubeadm), else the EKS Amazon
Linux 2 drop-in that holds `KUBELET_EXTRA_ARGS` (the `--image-service-endpoint` flag added).
Without `[cri] enable`, or without any of them, kubelet is left alone and the notes say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..config import Config
from ..configcheck import KUBELET_CONFIGS
from .files import FileChange, existing_mode, read_bytes
from .layout import KUBELET_DROPIN_DIR, Layout

EXTRA_ARGS_DROPIN = KUBELET_DROPIN_DIR / "30-kubelet-extra-args.conf"
FIELD = "imageServiceEndpoint"
FLAG = "--image-service-endpoint"


@dataclass(frozen=True, slots=True)
class KubeletPlan:
    changes: tuple[FileChange, ...]
    notes: tuple[str, ...]


def _json(text: str, endpoint: str) -> str | None:
    """`text` with the field set, indented as it was; None when it is not a JSON object."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    data[FIELD] = endpoint
    m = re.search(r"\n([ \t]+)\"", text)
    indent = m.group(1) if m else "  "
    return json.dumps(data, indent=indent) + ("\n" if text.endswith("\n") else "")


_YAML_FIELD = re.compile(rf"^{FIELD}:.*$", re.MULTILINE)


def _yaml(text: str, endpoint: str) -> str:
    """`text` with the top-level field set: its line replaced, or one added at the end
    (comments and every other line kept as they are)."""
    line = f"{FIELD}: {endpoint}"
    if _YAML_FIELD.search(text):
        return _YAML_FIELD.sub(line, text, count=1)
    sep = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{sep}{line}\n"


_EXTRA_ARGS = re.compile(r"^(Environment=['\"]?KUBELET_EXTRA_ARGS=)(.*?)(['\"]?)$", re.MULTILINE)


def _extra_args(text: str, endpoint: str) -> str | None:
    m = _EXTRA_ARGS.search(text)
    if m is None:
        return None
    args = [a for a in m.group(2).split() if not a.startswith(FLAG)]
    args.append(f"{FLAG}={endpoint}")
    return text[: m.start()] + m.group(1) + " ".join(args) + m.group(3) + text[m.end() :]


def plan_kubelet(layout: Layout, cfg: Config) -> KubeletPlan:
    """What to change so kubelet pulls through the CRI proxy. Reads only; raises OSError."""
    endpoint = f"unix://{cfg.cri.address}"
    if not cfg.cri.enable:
        return KubeletPlan((), ("kubelet left alone: [cri] enable is false",))
    for node_path in KUBELET_CONFIGS:
        path = layout(PurePosixPath(node_path))
        old = read_bytes(path)
        if old is None:
            continue
        text = old.decode("utf-8", "replace")
        new = _json(text, endpoint) if path.suffix == ".json" else _yaml(text, endpoint)
        if new is None:
            return KubeletPlan((), (f"kubelet left alone: {node_path} is not a JSON object",))
        change = FileChange(path, old, new.encode(), backup=True, mode=existing_mode(path))
        return KubeletPlan((change,) if change.changed else (), ())
    path = layout(EXTRA_ARGS_DROPIN)
    old = read_bytes(path)
    if old is not None:
        new = _extra_args(old.decode("utf-8", "replace"), endpoint)
        if new is not None:
            change = FileChange(path, old, new.encode(), backup=True, mode=existing_mode(path))
            return KubeletPlan((change,) if change.changed else (), ())
    return KubeletPlan(
        (),
        (
            f"kubelet left alone: no kubelet config found; start kubelet with "
            f"{FLAG}={endpoint} (or {FIELD} in its config)",
        ),
    )


__all__ = ["EXTRA_ARGS_DROPIN", "KubeletPlan", "plan_kubelet"]
