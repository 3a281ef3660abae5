"""Config loading, the checked-in default file, and `config check` messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.configcheck import check_all, check_containerd, check_image_fs
from snapshotter.errors import ConfigError
from snapshotter.lazy import BackgroundConfig, ReadConfig

REPO = Path(__file__).resolve().parents[2]

GOOD_V2 = """
version = 2
[proxy_plugins.sociable]
  type = "snapshot"
  address = "/run/sociable/sociable.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "sociable"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"""

GOOD_V3 = """
version = 3
[proxy_plugins.sociable]
  type = "snapshot"
  address = "/run/sociable/sociable.sock"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "sociable"
  disable_snapshot_annotations = false
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "/etc/containerd/certs.d"
"""


def test_checked_in_default_matches_render() -> None:
    checked_in = (REPO / "docs" / "config.default.toml").read_text()
    assert checked_in == config.render_default(), (
        "docs/config.default.toml is stale: run "
        "`python -m snapshotter.cli config default > docs/config.default.toml`"
    )


def test_the_push_default_is_the_servers() -> None:
    from snapshotter.fs.push import DEFAULT_PUSH_BYTES

    assert config.RemoteConfig().push_after_read_bytes == DEFAULT_PUSH_BYTES


def test_cli_prints_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "config", "default"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == config.render_default()


def test_default_round_trips(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(config.render_default())
    assert config.load(p) == config.Config()


def test_partial_file_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "[daemon]\ngrpc_threads = 4\nshutdown_grace_sec = 2\n[snapshots]\nfsync_dirs = false\n"
    )
    cfg = config.load(p)
    assert cfg.daemon.grpc_threads == 4
    assert cfg.daemon.shutdown_grace_sec == 2.0
    assert cfg.snapshots.fsync_dirs is False
    assert cfg.daemon.root == config.DEFAULT_ROOT


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_missing_default_file_means_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert config.load(None) == config.Config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\nport = 1\n", "unknown key 'port'"),
        ("[nope]\n", "unknown section [nope]"),
        ('[daemon]\ngrpc_threads = "8"\n', "[daemon] grpc_threads: expected int"),
        ("[daemon]\ngrpc_threads = true\n", "[daemon] grpc_threads: expected an integer"),
        ("[daemon]\ngrpc_threads = 0\n", "at least 1"),
        ('[daemon]\nlog_level = "loud"\n', "log_level"),
        ('[daemon]\nroot = "relative"\n', "absolute"),
        ('[daemon]\naddress = "tcp://x"\n', "address"),
        ("[daemon\n", "not valid TOML"),
        ("[remote]\nmax_request_bytes = 0\n", "[remote] max_request_bytes must be positive"),
        ("[remote]\nunpack_timeout_sec = 0\n", "unpack_timeout_sec must be positive"),
        ("[remote]\nreadahead_spans = -1\n", "[remote] readahead_spans must not be negative"),
        ("[remote]\nmemory_cache_spans = 0\n", "[remote] memory_cache_spans must be at least 1"),
        ("[remote]\ninflate_threads = -2\n", "[remote] inflate_threads"),
        ("[remote]\nfetch_max_attempts = 0\n", "[remote] max_attempts must be at least 1"),
        ("[remote]\nfetch_backoff_max_ms = 1\n", "[remote] bad backoff"),
        ("[remote]\nbackground_step_bytes = 0\n", "[remote] bad background fetch config"),
        ("[remote]\nbackground_error_backoff_sec = -1\n", "[remote] error_backoff_sec"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    assert message in str(ei.value)
    assert str(p) in str(ei.value)


def test_check_good_containerd_configs() -> None:
    cfg = config.Config()
    assert check_containerd(cfg, config.DEFAULT_ADDRESS, GOOD_V2, "c") == []
    assert check_containerd(cfg, config.DEFAULT_ADDRESS, GOOD_V3, "c") == []
    assert check_containerd(cfg, "fd://", GOOD_V2, "c") == []


def test_check_reports_each_problem_on_one_line() -> None:
    cfg = config.Config()
    problems = check_containerd(cfg, "/run/other.sock", "version = 2\n", "ctd")
    assert len(problems) == 4
    assert all("\n" not in p and p.startswith("ctd: ") for p in problems)
    text = "\n".join(problems)
    assert "[proxy_plugins.sociable] is missing" in text
    assert 'address = "/run/other.sock"' in text
    assert "snapshotter = 'overlayfs'" in text
    assert "disable_snapshot_annotations" in text
    assert "config_path is not set" in text


def test_check_wrong_address_type_and_annotations() -> None:
    cfg = config.Config()
    bad = GOOD_V2.replace('type = "snapshot"', 'type = "content"').replace(
        "disable_snapshot_annotations = false", "disable_snapshot_annotations = true"
    )
    problems = check_containerd(cfg, "/elsewhere.sock", bad, "c")
    assert any("type = 'content'" in p for p in problems)
    assert any('listens on "/elsewhere.sock"' in p for p in problems)
    assert any("disable_snapshot_annotations" in p for p in problems)
    assert len(problems) == 3


def test_check_version_and_invalid_toml() -> None:
    cfg = config.Config()
    assert any("version = 1" in p for p in check_containerd(cfg, "/x", "", "c"))
    assert check_containerd(cfg, "/x", "[[", "c")[0].startswith("c: not valid TOML")


def with_root(text: str, ctd_root: Path) -> str:
    """A containerd config with `root` set and the image-fs directory CRI needs created."""
    (ctd_root / "io.containerd.snapshotter.v1.sociable").mkdir(parents=True, exist_ok=True)
    return f'root = "{ctd_root}"\n' + text


def test_check_image_fs_dir(tmp_path: Path) -> None:
    cfg = config.Config()
    text = f'root = "{tmp_path / "ctd"}"\n' + GOOD_V2
    [problem] = check_image_fs(cfg, text, "c", tmp_path / "root")
    assert "io.containerd.snapshotter.v1.sociable does not exist" in problem
    assert check_image_fs(cfg, with_root(GOOD_V2, tmp_path / "ctd"), "c", tmp_path) == []
    [v3] = check_image_fs(cfg, GOOD_V3, "c", tmp_path / "root")
    assert "[proxy_plugins.sociable.exports] root is not set" in v3
    exported = GOOD_V3 + '[proxy_plugins.sociable.exports]\n  root = "/var/lib/sociable"\n'
    assert check_image_fs(cfg, exported, "c", tmp_path) == []


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(with_root(GOOD_V2, tmp_path / "ctd"))
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 2\n")
    ours = tmp_path / "ours.toml"
    ours.write_text("")

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "snapshotter.cli",
                "--config",
                str(ours),
                "config",
                "check",
                "--containerd-config",
                str(path),
                "--containerd-version",
                "1.7.16",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )

    ok = run(good)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    r = run(bad)
    assert r.returncode == 1 and len(r.stdout.strip().splitlines()) == 5
    missing = run(tmp_path / "absent.toml")
    assert missing.returncode == 1 and "cannot be read" in missing.stdout


def test_check_all_reads_file(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text(with_root(GOOD_V2, tmp_path / "ctd"))
    assert check_all(config.Config(), config.DEFAULT_ADDRESS, tmp_path / "root", p) == []
    long_addr = "/" + "a" * 120
    assert any("longer than" in x for x in check_all(config.Config(), long_addr, tmp_path, p))


def test_remote_keys_reach_the_read_fetch_and_background_settings(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "[remote]\nmax_request_bytes = 1048576\nreadahead_spans = 0\nmemory_cache_spans = 2\n"
        "inflate_threads = 3\nfetch_max_attempts = 2\nfetch_backoff_initial_ms = 10\n"
        "fetch_backoff_max_ms = 20\nrequest_timeout_sec = 5\nbackground_fetch = false\n"
        "background_quiet_period_ms = 7\nbackground_rate_bytes_per_sec = 0\n"
        "background_step_bytes = 65536\nbackground_error_backoff_sec = 1.5\n"
        "cache_max_bytes = 100\ninflated_cache_max_bytes = 0\n"
    )
    r = config.load(p).remote
    read = r.read_config()
    assert (read.max_request_bytes, read.readahead_spans) == (1048576, 0)
    assert (read.memory_cache_spans, read.inflate_threads) == (2, 3)
    fetch = r.fetch_config()
    assert (fetch.max_attempts, fetch.backoff_initial_ms, fetch.backoff_max_ms) == (2, 10, 20)
    assert fetch.request_timeout_sec == 5.0
    bg = r.background_config()
    assert (bg.enabled, bg.quiet_period_ms, bg.rate_bytes_per_sec) == (False, 7, 0)
    assert (bg.step_bytes, bg.error_backoff_sec) == (65536, 1.5)
    cache = r.cache_config()
    assert (cache.max_bytes, cache.inflated_max_bytes) == (100, 0)
    # the defaults are the library's defaults
    d = config.Config().remote
    assert d.read_config() == ReadConfig()
    assert d.background_config() == BackgroundConfig(quiet_period_ms=10000)


def test_peers_defaults_off_and_addresses_checked() -> None:
    cfg = config.from_mapping({})
    assert cfg.peers.enable is False
    good = config.from_mapping(
        {
            "peers": {
                "enable": True,
                "listen": "10.0.0.5:8472",
                "static": ["10.0.0.6:8472", "[fd00::7]:8472"],
                "owners": 3,
            }
        }
    )
    assert good.peers.static == ("10.0.0.6:8472", "[fd00::7]:8472")
    assert good.peers.advertised() == ("10.0.0.5", 8472)
    bad = [
        ({"listen": "nohost"}, "ADDR:PORT"),
        ({"listen": "10.0.0.1:99999"}, "port"),
        ({"static": ["peer.example:8472"]}, "not an IP address"),
        ({"static": ["0.0.0.0:8472"]}, "not an address other nodes can reach"),
        ({"static": "10.0.0.1:1"}, "list of strings"),
        ({"enable": True, "listen": "0.0.0.0:8472"}, "advertise"),
        ({"kubernetes_service": "just-a-name"}, "NAMESPACE/NAME"),
        ({"owners": 0}, "owners"),
        ({"chunk_bytes": 1000}, "chunk_bytes"),
        ({"budget_sec": 0}, "budget_sec"),
        ({"down_backoff_sec": 10.0, "down_backoff_max_sec": 5.0}, "down_backoff_max_sec"),
    ]
    for table, fragment in bad:
        with pytest.raises(ConfigError, match="peers") as info:
            config.from_mapping({"peers": table})
        assert fragment in str(info.value), (table, str(info.value))
        assert "\n" not in str(info.value)


def test_check_peers_findings(tmp_path: Path) -> None:
    from snapshotter.configcheck import check_peers, is_warning

    assert check_peers(config.from_mapping({})) == []
    alone = config.from_mapping({"peers": {"enable": True, "listen": "127.0.0.1:8472"}})
    findings = check_peers(alone)
    assert len(findings) == 1 and is_warning(findings[0]) and "no members" in findings[0]
    broken = config.from_mapping(
        {
            "peers": {
                "enable": True,
                "listen": "192.0.2.77:8472",
                "static": ["127.0.0.2:8472"],
                "token_file": str(tmp_path / "missing-token"),
            }
        }
    )
    findings = check_peers(broken)
    errors = [f for f in findings if not is_warning(f)]
    assert any("192.0.2.77 is not an address of this node" in f for f in errors)
    assert any("token_file" in f for f in errors)
    assert any(is_warning(f) and "advertise" in f for f in findings)


def test_own_mirror_hosts_are_what_hosts_toml_may_call_this_node() -> None:
    from snapshotter.config import PeersConfig
    from snapshotter.peers.node import own_mirror_hosts

    assert own_mirror_hosts(PeersConfig()) == set()
    hosts = own_mirror_hosts(
        PeersConfig(enable=True, listen="0.0.0.0:8472", advertise="10.0.0.5:8472")
    )
    assert {"127.0.0.1:8472", "localhost:8472", "10.0.0.5:8472"} <= hosts
    assert all(h.endswith(":8472") for h in hosts)


def test_check_mirror_findings(tmp_path: Path) -> None:
    from snapshotter.configcheck import check_mirror, is_warning

    sock = tmp_path / "containerd.sock"
    sock.touch()
    on = config.from_mapping(
        {
            "peers": {"enable": True, "listen": "127.0.0.1:8472"},
            "mirror": {"containerd_address": str(sock)},
        }
    )
    assert check_mirror(config.from_mapping({}), GOOD_V2, "c") == []  # peers off: no mirror
    assert check_mirror(on, GOOD_V2, "c") == []
    discarding = GOOD_V2.replace(
        "disable_snapshot_annotations = false",
        "disable_snapshot_annotations = false\n  discard_unpacked_layers = true",
    )
    findings = check_mirror(on, discarding, "c")
    assert len(findings) == 1 and "discard_unpacked_layers" in findings[0]
    assert not is_warning(findings[0])
    no_hosts = GOOD_V2.replace('config_path = "/etc/containerd/certs.d"', "")
    assert any("config_path" in f for f in check_mirror(on, no_hosts, "c"))
    v3 = check_mirror(on, GOOD_V3, "c")
    assert any("use_local_image_pull" in f for f in v3)
    gone = config.from_mapping(
        {
            "peers": {"enable": True, "listen": "127.0.0.1:8472"},
            "mirror": {"containerd_address": str(tmp_path / "missing.sock")},
        }
    )
    (finding,) = check_mirror(gone, GOOD_V2, "c")
    assert is_warning(finding) and "containerd_address" in finding


def test_check_credentials_findings(tmp_path: Path) -> None:
    from snapshotter.configcheck import check_credentials, is_warning

    assert check_credentials(config.from_mapping({}), ()) == []
    cfg = config.from_mapping(
        {
            "cri": {"enable": True, "address": "/run/sociable/cri.sock"},
            "credential_providers": {"config": str(tmp_path / "missing.yaml")},
        }
    )
    findings = check_credentials(cfg, ())
    errors = [f for f in findings if not is_warning(f)]
    assert any("missing.yaml" in f for f in errors)
    assert any("bin_dir" in f for f in errors)
    flag = "--image-service-endpoint=unix:///run/sociable/cri.sock"
    assert any(is_warning(f) and flag in f for f in findings)
    kubelet = tmp_path / "config.json"
    kubelet.write_text('{"imageServiceEndpoint": "unix:///run/containerd/containerd.sock"}')
    (finding,) = [f for f in check_credentials(cfg, (kubelet,)) if "kubelet config" in f]
    assert is_warning(finding) and flag in finding
    kubelet.write_text('{"imageServiceEndpoint": "unix:///run/sociable/cri.sock"}')
    assert not [f for f in check_credentials(cfg, (kubelet,)) if "kubelet config" in f]
