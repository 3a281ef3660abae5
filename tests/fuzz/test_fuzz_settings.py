"""Text an operator or containerd hands the daemon: `hosts.toml`, the daemon config, and the
CRI labels of a Prepare.

- `hosts.toml` (`index.oci.hosts.HostsConfig.load`): valid files give the endpoints they
  describe; damaged ones (wrong TOML types, odd unicode, bad URLs, damaged bytes) give
  `HostsConfigError`.
- the daemon config (`snapshotter.config.load`): a file `render` wrote loads back equal;
  damaged ones give `ConfigError`; whatever loads has finite numbers.
- Prepare labels (`remote/labels.py` `LayerLabels.parse`, then `Reference.parse` of the image,
  as the mounter does): valid labels round-trip; damaged ones give `BadLabels` or an
  `OciError` (the mounter's `no_cri_labels` fallback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomlkit
from hypothesis import example, given, reject
from hypothesis import strategies as st

from index.digest import Digest
from index.oci.errors import HostsConfigError, OciError
from index.oci.hosts import HOSTS_FILE, HostsConfig
from index.oci.reference import Reference
from snapshotter import config as daemon_config
from snapshotter.errors import ConfigError
from snapshotter.remote import labels as L
from snapshotter.remote.errors import BadLabels
from tests.fuzz.strategies import (
    fuzz_settings,
    mutated_bytes,
    mutated_doc,
    safe_text,
)

REGISTRY = "registry.test"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sociable-fuzz-") as d:
        yield Path(d)


def _toml(doc: Any) -> bytes:
    """`doc` as TOML bytes (null values dropped, lone surrogates kept as invalid UTF-8);
    rejects the example when TOML cannot express it."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {str(k): clean(v) for k, v in node.items() if v is not None}
        if isinstance(node, list):
            return [clean(v) for v in node if v is not None]
        return node

    try:
        text = tomlkit.dumps(clean(doc))
    except Exception:  # what tomlkit cannot write is not a file anyone can hand us
        reject()
    return text.encode("utf-8", "surrogatepass")


# --- hosts.toml ---------------------------------------------------------------------------------

MIRROR_URLS = (
    "https://mirror-a.test",
    "http://127.0.0.1:5000",
    "mirror-b.test:8443/cache",
    "https://[::1]:5001",
    "https://mirror-c.test/v2",
)
CAPABILITIES = ("pull", "resolve", "push")


@st.composite
def hosts_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid hosts.toml document."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["server"] = draw(st.sampled_from(("https://registry.test", "http://registry.test")))
    hosts: dict[str, Any] = {}
    for url in draw(st.lists(st.sampled_from(MIRROR_URLS), unique=True, max_size=3)):
        table: dict[str, Any] = {
            "capabilities": draw(st.lists(st.sampled_from(CAPABILITIES), unique=True)),
        }
        if draw(st.booleans()):
            table["skip_verify"] = draw(st.booleans())
        if draw(st.booleans()):
            table["override_path"] = draw(st.booleans())
        if draw(st.booleans()):
            table["header"] = {"x-fuzz": draw(st.sampled_from(("a", ["b", "c"])))}
        if draw(st.booleans()):
            table["ca"] = draw(st.sampled_from(("ca.pem", ["/etc/ca.pem", "other.pem"])))
        if draw(st.booleans()):
            table["client"] = draw(st.sampled_from(("c.pem", [["c.pem", "k.pem"]])))
        hosts[url] = table
    if hosts or draw(st.booleans()):
        doc["host"] = hosts
    return doc


def _load_hosts(workdir: Path, data: bytes) -> HostsConfig:
    directory = workdir / "certs.d" / REGISTRY
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HOSTS_FILE).write_bytes(data)
    return HostsConfig.load([workdir / "certs.d"], REGISTRY)


@fuzz_settings(150)
@given(hosts_docs())
def test_valid_hosts_files_give_their_endpoints(workdir: Path, doc: dict[str, Any]) -> None:
    hosts = _load_hosts(workdir, _toml(doc))
    assert len(hosts.mirrors) == len(doc.get("host", {}))
    for mirror, (url, table) in zip(hosts.mirrors, doc.get("host", {}).items(), strict=True):
        assert mirror.capabilities == frozenset(table["capabilities"])
        assert mirror.skip_verify == table.get("skip_verify", False)
        assert mirror.host in url and not mirror.is_upstream
        header = table.get("header", {}).get("x-fuzz")
        if header is not None:
            assert list(mirror.headers["x-fuzz"]) == (
                [header] if isinstance(header, str) else header
            )
    assert hosts.upstream.host == REGISTRY


@fuzz_settings(250)
@example({"host": {"https://[::1": {}}})
@example({"host": {"https://mirror.test": {"client": 5}}})
@example({"host": {"https://mirror.test": {"header": {"x": 5}}}})
@example({"server": "https://registry.test:99999"})
@example({"host": {"https://mirror.test:abc": {}}})
@example({"host": {"https://mirror\x00.test": {}}})
@example({"server": "\u00a1"})  # not a valid IDNA host name
@given(hosts_docs().flatmap(mutated_doc))
def test_damaged_hosts_documents(workdir: Path, doc: Any) -> None:
    if not isinstance(doc, dict):
        doc = {"value": doc}
    try:
        hosts = _load_hosts(workdir, _toml(doc))
    except HostsConfigError:
        return
    for endpoint in hosts.endpoints():
        assert endpoint.scheme in ("http", "https") and endpoint.host
        httpx.URL(endpoint.base_url + "/fuzz/manifests/latest")  # what every request builds


@fuzz_settings(150)
@given(hosts_docs().flatmap(lambda doc: mutated_bytes(_toml(doc))))
def test_damaged_hosts_bytes(workdir: Path, data: bytes) -> None:
    with contextlib.suppress(HostsConfigError):
        _load_hosts(workdir, data)


# --- the daemon config --------------------------------------------------------------------------


def _field_values(kind: type) -> st.SearchStrategy[Any]:
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(0, 1 << 40)
    if kind is float:
        return st.floats(0.001, 1e6)
    if kind is tuple:
        return st.lists(st.sampled_from(("10.0.0.1:8472", "[fd00::1]:8472")), max_size=2).map(tuple)
    return st.sampled_from(
        (
            "/run/sociable/fuzz.sock",
            "/var/lib/sociable-fuzz",
            "info",
            "debug",
            "ns/name",
            "",
            "10.0.0.1:8472",
        )
    )


@st.composite
def config_docs(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """A config document: some keys of some sections set to plausible values (not every
    combination is valid)."""
    doc: dict[str, dict[str, Any]] = {}
    defaults = daemon_config.Config()
    for section in dataclasses.fields(defaults):
        if not draw(st.booleans()):
            continue
        sub = getattr(defaults, section.name)
        table: dict[str, Any] = {}
        for f in dataclasses.fields(sub):
            if draw(st.integers(0, 4)) == 0:
                value = draw(_field_values(type(getattr(sub, f.name))))
                table[f.name] = list(value) if isinstance(value, tuple) else value
        doc[section.name] = table
    return doc


def _load_config(workdir: Path, data: bytes) -> daemon_config.Config:
    path = workdir / "config.toml"
    path.write_bytes(data)
    return daemon_config.load(path)


def _finite(cfg: daemon_config.Config) -> bool:
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                return False
    return True


def test_default_config_round_trips(workdir: Path) -> None:
    text = daemon_config.render_default()
    assert _load_config(workdir, text.encode()) == daemon_config.Config()


@fuzz_settings(150)
@given(config_docs())
def test_config_files_load_as_written(workdir: Path, doc: dict[str, dict[str, Any]]) -> None:
    try:
        cfg = _load_config(workdir, _toml(doc))
    except ConfigError:
        return
    for section, table in doc.items():
        for key, value in table.items():
            loaded = getattr(getattr(cfg, section), key)
            assert loaded == (tuple(value) if isinstance(value, list) else value)
    assert _load_config(workdir, daemon_config.render(cfg).encode()) == cfg


@fuzz_settings(250)
@example({"remote": {"mount_timeout_sec": math.nan}})
@example({"daemon": {"shutdown_grace_sec": math.inf}})
@example({"remote": {"cache_max_bytes": 1 << 70}})
@given(config_docs().flatmap(mutated_doc))
def test_damaged_config_documents(workdir: Path, doc: Any) -> None:
    if not isinstance(doc, dict):
        doc = {"daemon": doc}
    try:
        cfg = _load_config(workdir, _toml(doc))
    except ConfigError:
        return
    assert _finite(cfg)


@fuzz_settings(150)
@example(b"[daemon]\nroot = '\xff'\n")
@given(mutated_bytes(daemon_config.render_default().encode(), max_ops=3))
def test_damaged_config_bytes(workdir: Path, data: bytes) -> None:
    try:
        cfg = _load_config(workdir, data)
    except ConfigError:
        return
    assert _finite(cfg)


# --- CRI labels on Prepare ----------------------------------------------------------------------

DIGESTS = st.binary(min_size=32, max_size=32).map(lambda b: Digest("sha256:" + b.hex()))


@st.composite
def valid_labels(draw: st.DrawFn) -> dict[str, str]:
    labels = {
        L.TARGET_REF: "sha256:" + draw(DIGESTS).hex,
        L.CRI_IMAGE_REF: draw(
            st.sampled_from(("docker.io/library/busybox:latest", "registry.test:5000/a/b:v1"))
        ),
        L.CRI_MANIFEST_DIGEST: str(draw(DIGESTS)),
        L.CRI_LAYER_DIGEST: str(draw(DIGESTS)),
    }
    layers = draw(st.lists(DIGESTS, max_size=4))
    if layers:
        labels[L.CRI_IMAGE_LAYERS] = ",".join(layers)
    if draw(st.booleans()):
        labels[L.SOCI_INDEX_DIGEST] = str(draw(DIGESTS))
    if draw(st.booleans()):
        labels["containerd.io/snapshot/other"] = draw(safe_text())
    return labels


@fuzz_settings(150)
@given(valid_labels())
def test_valid_labels_round_trip(labels: dict[str, str]) -> None:
    parsed = L.LayerLabels.parse(labels)
    assert parsed.target == labels[L.TARGET_REF]
    assert parsed.manifest_digest == labels[L.CRI_MANIFEST_DIGEST]
    assert parsed.layer_digest == labels[L.CRI_LAYER_DIGEST]
    assert ",".join(parsed.image_layers) == labels.get(L.CRI_IMAGE_LAYERS, "")
    assert parsed.index_digest == labels.get(L.SOCI_INDEX_DIGEST)
    assert str(Reference.parse(parsed.image_ref)).endswith(labels[L.CRI_IMAGE_REF].split("/")[-1])


@st.composite
def damaged_labels(draw: st.DrawFn) -> dict[str, str]:
    labels = draw(valid_labels())
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*labels, L.CRI_IMAGE_LAYERS, L.SOCI_INDEX_DIGEST]))
        op = draw(st.sampled_from(("replace", "delete", "append", "truncate")))
        if op == "delete":
            labels.pop(key, None)
        elif op == "replace":
            labels[key] = draw(safe_text())
        elif op == "append":
            labels[key] = labels.get(key, "") + draw(safe_text(8))
        else:
            value = labels.get(key, "")
            labels[key] = value[: draw(st.integers(0, len(value)))]
    return labels


@fuzz_settings(250)
@example(
    {
        L.TARGET_REF: "t",
        L.CRI_IMAGE_REF: "x",
        L.CRI_MANIFEST_DIGEST: "sha256:",
        L.CRI_LAYER_DIGEST: "y",
    }
)
@given(damaged_labels())
def test_damaged_labels(labels: dict[str, str]) -> None:
    try:
        parsed = L.LayerLabels.parse(labels)
        Reference.parse(parsed.image_ref)
    except (BadLabels, OciError):
        return
    assert isinstance(parsed.manifest_digest, Digest)
    assert all(isinstance(d, Digest) for d in parsed.image_layers)
