"""hosts.toml lookup order, schema, defaults and endpoint lists (containerd's config_path layout)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from index.oci.errors import HostsConfigError
from index.oci.hosts import (
    CAP_PULL,
    CAP_PUSH,
    CAP_REFERRERS,
    CAP_RESOLVE,
    HostsConfig,
    is_local_host,
    needs_namespace_param,
)
from index.oci.hostscache import HostsCache


def write(root: Path, directory: str, text: str) -> Path:
    d = root / directory
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


def test_defaults_without_config(tmp_path: Path) -> None:
    hub = HostsConfig.load([tmp_path], "docker.io")
    assert [h.base_url for h in hub.endpoints()] == ["https://registry-1.docker.io/v2"]
    local = HostsConfig.load([tmp_path], "localhost:5000")
    assert local.upstream.base_url == "http://localhost:5000/v2"
    assert HostsConfig.default("127.0.0.1:99").upstream.scheme == "http"
    assert HostsConfig.default("[::1]:99").upstream.scheme == "http"
    assert HostsConfig.default("ghcr.io").upstream.scheme == "https"
    assert HostsConfig.default("ghcr.io", plain_http=True).upstream.scheme == "http"
    assert HostsConfig.default("localhost", plain_http=False).upstream.scheme == "https"
    assert hub.source is None


def test_lookup_order(tmp_path: Path) -> None:
    write(tmp_path, "_default", '[host."https://default-mirror"]\n')
    assert HostsConfig.load([tmp_path], "r.io:5000").mirrors[0].host == "default-mirror"
    write(tmp_path, "r.io:5000", '[host."https://verbatim"]\n')
    assert HostsConfig.load([tmp_path], "r.io:5000").mirrors[0].host == "verbatim"
    write(tmp_path, "r.io_5000_", '[host."https://underscored"]\n')
    cfg = HostsConfig.load([tmp_path], "r.io:5000")
    assert cfg.mirrors[0].host == "underscored"
    assert cfg.source == tmp_path / "r.io_5000_" / "hosts.toml"


def test_first_root_with_a_directory_wins(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    write(b, "docker.io", '[host."https://from-b"]\n')
    write(tmp_path / "c", "docker.io", '[host."https://from-c"]\n')
    cfg = HostsConfig.load(f"{a}:{b}:{tmp_path / 'c'}", "docker.io")
    assert [h.host for h in cfg.mirrors] == ["from-b"]


def test_schema(tmp_path: Path) -> None:
    d = write(
        tmp_path,
        "docker.io",
        """
server = "https://registry-1.docker.io"
capabilities = ["pull", "resolve"]

[host."http://mirror1:5000"]
  capabilities = ["pull"]
  skip_verify = true
  header = { X-One = "1", X-Many = ["a", "b"] }

[host."mirror2.example/custom/v2"]
  ca = ["ca.pem", "/abs/ca2.pem"]
  client = [["c.pem", "k.pem"], ["both.pem", ""]]

[host."https://mirror3/api"]
  override_path = true
  client = "single.pem"
""",
    )
    cfg = HostsConfig.load([tmp_path], "docker.io")
    m1, m2, m3 = cfg.mirrors
    assert m1.base_url == "http://mirror1:5000/v2"
    assert m1.capabilities == {CAP_PULL} and m1.skip_verify
    assert m1.headers == {"X-One": ("1",), "X-Many": ("a", "b")}
    assert m2.base_url == "https://mirror2.example/custom/v2"
    assert m2.ca == (d / "ca.pem", Path("/abs/ca2.pem"))
    assert m2.client == ((d / "c.pem", d / "k.pem"), (d / "both.pem", None))
    assert m3.base_url == "https://mirror3/api"
    assert m3.client == ((d / "single.pem", None),)
    assert cfg.upstream.base_url == "https://registry-1.docker.io/v2"
    assert cfg.upstream.capabilities == {CAP_PULL, CAP_RESOLVE} and cfg.upstream.is_upstream
    assert not m1.is_upstream
    assert [h.host for h in cfg.endpoints(CAP_PULL)] == [
        "mirror1:5000",
        "mirror2.example",
        "mirror3",
        "registry-1.docker.io",
    ]
    assert [h.host for h in cfg.endpoints(CAP_RESOLVE)] == [
        "mirror2.example",
        "mirror3",
        "registry-1.docker.io",
    ]
    assert [h.host for h in cfg.endpoints(CAP_PUSH)] == ["mirror2.example", "mirror3"]
    assert [h.host for h in cfg.endpoints(CAP_REFERRERS)] == [
        "mirror2.example",
        "mirror3",
        "registry-1.docker.io",
    ]


def test_localhost_mirror_defaults_to_http(tmp_path: Path) -> None:
    write(tmp_path, "docker.io", '[host."127.0.0.1:5001"]\n')
    assert (
        HostsConfig.load([tmp_path], "docker.io").mirrors[0].base_url == "http://127.0.0.1:5001/v2"
    )


@pytest.mark.parametrize(
    "text",
    [
        '[host."https://m"]\ncapabilities = ["pull", "fly"]\n',
        '[host."https://m"]\nskip_verify = "yes"\n',
        '[host."ftp://m"]\n',
        'server = [1]\n[host."https://m"]\n',
        "this is = not toml [",
        '[host."https://m"]\nclient = [["a", "b", "c"]]\n',
    ],
)
def test_invalid_files(tmp_path: Path, text: str) -> None:
    write(tmp_path, "r.io", text)
    with pytest.raises(HostsConfigError, match=r"hosts\.toml"):
        HostsConfig.load([tmp_path], "r.io")


def test_file_without_host_table_warns_about_containerd_16(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "r.io", 'server = "https://upstream.example"\n')
    with caplog.at_level(logging.WARNING):
        cfg = HostsConfig.load([tmp_path], "r.io")
    assert cfg.upstream.host == "upstream.example"
    assert "containerd 1.6" in caplog.text


def test_docker_style_cert_files(tmp_path: Path) -> None:
    d = tmp_path / "r.io"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert"):
        (d / name).write_text("x")
    cfg = HostsConfig.load([tmp_path], "r.io")
    assert cfg.upstream.ca == (d / "ca.crt",)
    assert cfg.upstream.client == ((d / "client.cert", d / "client.key"),)


def test_namespace_param_rules() -> None:
    assert needs_namespace_param("mirror:5000", "docker.io")
    assert not needs_namespace_param("registry-1.docker.io", "docker.io")
    assert not needs_namespace_param("r.io", "r.io")
    assert is_local_host("localhost:1") and is_local_host("127.0.0.2") and is_local_host("[::1]:5")
    assert not is_local_host("example.com:5000")


def test_cache_leaves_out_the_mirrors_it_is_told_to_skip(tmp_path: Path) -> None:
    """A daemon that is itself containerd's first mirror must not ask itself."""
    (tmp_path / "reg.test").mkdir()
    (tmp_path / "reg.test" / "hosts.toml").write_text(
        'server = "https://reg.test"\n'
        '[host."http://127.0.0.1:8472"]\n  capabilities = ["pull", "resolve"]\n'
        '[host."https://cache.test"]\n  capabilities = ["pull"]\n'
    )
    every = HostsCache([tmp_path]).get("reg.test")
    assert [h.host for h in every.mirrors] == ["127.0.0.1:8472", "cache.test"]
    cache = HostsCache([tmp_path], skip_mirrors={"127.0.0.1:8472", "reg.test"})
    config = cache.get("reg.test")
    assert [h.host for h in config.mirrors] == ["cache.test"]
    assert config.upstream.host == "reg.test"  # the upstream is never left out
