"""`sociable-snapshotter status`: the table, `--json`, no daemon (exit 7), and the metrics
config and its check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter import cli
from snapshotter.config import Config, ConfigError, MetricsConfig, PeersConfig, from_mapping
from snapshotter.configcheck import check_metrics, is_warning
from snapshotter.remote.status import (
    DaemonNotRunning,
    DaemonStatus,
    human_bytes,
    json_report,
    read_status,
    render_table,
    short_digest,
    write_daemon_status,
)

REPO = Path(__file__).resolve().parents[2]
BULK = "sha256:" + "ab12cd34ef56" + "0" * 52
SMALL = "sha256:" + "99" * 32


def sample(root: Path) -> DaemonStatus:
    daemon: dict[str, object] = {
        "pid": 4242,
        "lazyLayers": "enabled",
        "peers": {
            "state": "enabled",
            "advertise": "10.0.0.1:8472",
            "members": [
                {"peer": "10.0.0.2:8472", "state": "up", "lastError": ""},
                {"peer": "10.0.0.3:8472", "state": "down", "lastError": "connection refused"},
            ],
            "fetch": {"bytes_fetched": 3 * 1024 * 1024},
            "serve": {"bytes_served": 512},
        },
        "restoreFailed": {"snap-9": "registry down"},
    }
    layers: list[dict[str, object]] = [
        {
            "fuseDir": "snap-7",
            "image": "registry.test/lazy/bulk:v1",
            "digest": BULK,
            "fetchedPercent": 55.09,
            "totalSize": 31_600_000,
            "bytesFrom": {"cache": 0, "peers": 1024, "registry": 17_397_947},
            "readErrors": 1,
            "fetchErrors": 2,
            "taskErrors": 0,
            "lastFetchError": "every source failed",
        },
        {
            "fuseDir": "snap-8",
            "image": "registry.test/lazy/bulk:v1",
            "digest": SMALL,
            "fetchedPercent": 100.0,
            "totalSize": 512,
            "bytesFrom": {"cache": 512, "peers": 0, "registry": 0},
            "readErrors": 0,
            "fetchErrors": 0,
            "taskErrors": 0,
        },
    ]
    return DaemonStatus(root, daemon, layers)


def test_table_shows_daemon_layers_peers_and_failures(tmp_path: Path) -> None:
    text = render_table(sample(tmp_path))
    lines = text.splitlines()
    assert lines[0] == f"daemon: pid 4242, serving {tmp_path}, lazy layers enabled, 2 mounted"
    header = next(i for i, line in enumerate(lines) if line.startswith("LAYER"))
    assert lines[header].split() == [
        "LAYER", "IMAGE", "DIGEST", "FETCHED", "SIZE", "CACHE", "PEERS", "REGISTRY", "ERRORS",
    ]  # fmt: skip
    bulk = lines[header + 1].split()
    assert bulk[:4] == ["snap-7", "registry.test/lazy/bulk:v1", "ab12cd34ef56", "55.1%"]
    assert bulk[-1] == "3"  # read + fetch + task errors
    assert "16.6 MiB" in lines[header + 1] and "1.0 KiB" in lines[header + 1]
    small = lines[header + 2].split()
    assert small[2:4] == ["999999999999", "100.0%"] and small[-1] == "0"
    # columns line up: every row as long as the header's cells
    assert len({len(lines[header + i]) for i in range(3)}) == 1
    assert "snap-7: last error: every source failed" in lines
    assert (
        "peers: 10.0.0.1:8472, 2 members (1 up, 1 down), fetched 3.0 MiB from peers, "
        "served 512 B to peers" in lines
    )
    assert "  10.0.0.3:8472 down: connection refused" in lines
    assert lines[-1] == "snap-9: restore failed: registry down"
    assert text.endswith("\n")


def test_table_of_a_degraded_daemon_and_of_no_layers(tmp_path: Path) -> None:
    degraded = DaemonStatus(
        tmp_path, {"pid": 1, "lazyLayers": "degraded", "component": "fuse", "error": "no fuse"}, []
    )
    assert render_table(degraded) == (
        f"daemon: pid 1, serving {tmp_path}, lazy layers degraded (fuse: no fuse)\n"
    )
    empty = DaemonStatus(tmp_path, {"pid": 1, "lazyLayers": "enabled"}, [])
    assert render_table(empty).splitlines()[1] == "no lazy layers mounted"


def test_json_lines_keep_their_format(tmp_path: Path) -> None:
    report = json_report(sample(tmp_path))
    docs = [json.loads(line) for line in report.lines]
    assert [d.get("fuseDir") for d in docs[:2]] == ["snap-7", "snap-8"]
    assert docs[0]["bytesFrom"] == {"cache": 0, "peers": 1024, "registry": 17_397_947}
    assert "members" not in docs[2]["peers"] and docs[2]["peers"]["state"] == "enabled"
    assert [d.get("peer") for d in docs[3:5]] == ["10.0.0.2:8472", "10.0.0.3:8472"]
    assert docs[5] == {"fuseDir": "snap-9", "restoreFailed": "registry down"}
    assert report.note == ""


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (17_397_947, "16.6 MiB"), (None, "-")],
)
def test_human_bytes(n: object, text: str) -> None:
    assert human_bytes(n) == text


def test_short_digest() -> None:
    assert short_digest(BULK) == "ab12cd34ef56"
    assert short_digest("") == "-"


def test_no_daemon_is_one_line_and_exit_7(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match=r"no daemon is serving .* \(no .*status.json\)"):
        read_status(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    write_daemon_status(tmp_path, {"lazyLayers": "enabled"})
    doc = json.loads((tmp_path / "status.json").read_text())
    doc["pid"] = int(dead.stdout)
    (tmp_path / "status.json").write_text(json.dumps(doc))
    with pytest.raises(DaemonNotRunning, match=f"pid {int(dead.stdout)} is not running"):
        read_status(tmp_path)
    for extra in ([], ["--json"]):
        proc = subprocess.run(
            [sys.executable, "-m", "snapshotter.cli", "--root", str(tmp_path), "status", *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
        assert proc.returncode == cli.EXIT_NOT_RUNNING == 7
        assert proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"sociable-snapshotter: error: no daemon is serving {tmp_path} "
            f"(pid {int(dead.stdout)} is not running)"
        ]


def test_status_of_this_process_as_a_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_daemon_status(tmp_path, {"lazyLayers": "enabled", "layers": {}})  # our own pid
    assert cli.run(["--root", str(tmp_path), "status"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"daemon: pid {os.getpid()}, serving {tmp_path}, lazy layers enabled")
    assert cli.run(["--root", str(tmp_path), "status", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == "no lazy layers mounted\n"


# -- [metrics] ------------------------------------------------------------------------------


def test_metrics_address_is_checked_when_loading() -> None:
    assert from_mapping({}).metrics.address == ""
    assert from_mapping({"metrics": {"address": "127.0.0.1:9101"}}).metrics.address
    for bad in ("localhost:9101", "127.0.0.1", "127.0.0.1:0", "::1:9101"):
        with pytest.raises(ConfigError, match=r"\[metrics\] address"):
            from_mapping({"metrics": {"address": bad}})


def test_config_check_of_the_metrics_address() -> None:
    assert check_metrics(Config()) == []
    loopback = Config(metrics=MetricsConfig(address="127.0.0.1:9101"))
    assert check_metrics(loopback) == []
    clash = Config(
        metrics=MetricsConfig(address="127.0.0.1:8472"),
        peers=PeersConfig(enable=True, listen="0.0.0.0:8472", advertise="10.0.0.1:8472"),
    )
    [problem] = check_metrics(clash)
    assert not is_warning(problem) and "peer listener" in problem
    everyone = check_metrics(Config(metrics=MetricsConfig(address="0.0.0.0:9101")))
    assert len(everyone) == 1 and is_warning(everyone[0])
