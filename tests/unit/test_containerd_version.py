"""`config check` and containerd's version: the version read out of `containerd --version`
(upstream, Debian, Docker's containerd.io, 2.x module paths, bare and v-prefixed), a warning
for a containerd that cannot be told where a proxy snapshotter's disk is (before 1.7.16, or
1.6.32 on 1.6), and the command line taking the version from the flag or from the installed
binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.configcheck import (
    ContainerdVersion,
    check_all,
    check_containerd_version,
    has_root_export,
    installed_containerd_version,
    is_warning,
    parse_containerd_version,
)
from tests.support.cli import snapshotter_cli


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.6.20", ContainerdVersion(1, 6, 20)),
        ("v1.7.16", ContainerdVersion(1, 7, 16)),
        (
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
            ContainerdVersion(1, 6, 20),
        ),
        (
            "containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da",
            ContainerdVersion(1, 7, 27),
        ),
        (
            "containerd github.com/containerd/containerd/v2 v2.0.4 "
            "1a43cb6a1035441f9aca8f5666a9b3ef9e70ab20",
            ContainerdVersion(2, 0, 4),
        ),
        (
            "containerd github.com/containerd/containerd 1.7.12-0ubuntu4",
            ContainerdVersion(1, 7, 12),
        ),
        ("v2.0.0-rc.1", ContainerdVersion(2, 0, 0, prerelease=True)),
        ("1.7.16-beta.2", ContainerdVersion(1, 7, 16, prerelease=True)),
        ("", None),
        ("containerd version unknown", None),
        ("containerd 1.7 05044ec0a9a7", None),
    ],
)
def test_versions_are_read_from_what_containerd_prints(
    text: str, expected: ContainerdVersion | None
) -> None:
    assert parse_containerd_version(text) == expected


@pytest.mark.parametrize(
    ("version", "exported"),
    [
        ("1.5.18", False),
        ("1.6.20", False),
        ("1.6.31", False),
        ("1.6.32", True),
        ("1.6.39", True),
        ("1.7.15", False),
        ("1.7.16-rc.0", False),
        ("1.7.16", True),
        ("1.7.27", True),
        ("2.0.0-rc.1", True),
        ("2.0.0", True),
        ("2.1.4", True),
    ],
)
def test_the_root_export_arrived_in_1_7_16_and_1_6_32(version: str, exported: bool) -> None:
    parsed = parse_containerd_version(version)
    assert parsed is not None
    assert has_root_export(parsed) is exported


@pytest.mark.parametrize(
    "text",
    [
        "1.6.20",
        "1.7.15",
        "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
    ],
)
def test_an_old_containerd_is_one_warning_naming_the_version_and_the_table(text: str) -> None:
    (finding,) = check_containerd_version(config.Config(), text)
    assert is_warning(finding)
    version = parse_containerd_version(text)
    assert f"containerd {version} is older than 1.7.16" in finding
    assert "[proxy_plugins.sociable.exports] root" in finding
    assert "io.containerd.snapshotter.v1.sociable" in finding


@pytest.mark.parametrize(
    "text",
    ["1.7.16", "1.6.32", "v2.0.4", "containerd containerd.io 1.7.27 05044ec0a9a75232cad45"],
)
def test_a_recent_containerd_is_fine(text: str) -> None:
    assert check_containerd_version(config.Config(), text) == []


def test_an_unknown_version_is_a_warning_saying_how_to_give_it() -> None:
    (missing,) = check_containerd_version(config.Config(), "")
    assert is_warning(missing) and "--containerd-version" in missing
    (garbled,) = check_containerd_version(config.Config(), "x" * 200)
    assert is_warning(garbled) and "--containerd-version" in garbled
    assert len(garbled) < 200  # the text is cut, the line stays one readable line


def test_installed_version_runs_the_binary(tmp_path: Path) -> None:
    fake = tmp_path / "containerd"
    fake.write_text("#!/bin/sh\necho 'containerd containerd.io 1.7.27 05044ec'\n")
    fake.chmod(0o755)
    assert installed_containerd_version(str(fake)) == "containerd containerd.io 1.7.27 05044ec"
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 1.7.27; exit 1\n")
    failing.chmod(0o755)
    assert installed_containerd_version(str(failing)) == ""
    assert installed_containerd_version(str(tmp_path / "absent")) == ""
    hanging = tmp_path / "hanging"
    hanging.write_text("#!/bin/sh\nexec sleep 5\n")
    hanging.chmod(0o755)
    assert installed_containerd_version(str(hanging), timeout_sec=0.2) == ""


def test_check_all_checks_the_version_only_when_given(tmp_path: Path) -> None:
    ctd = tmp_path / "config.toml"
    ctd.write_text("")
    cfg = config.Config()
    root = tmp_path / "root"
    unchecked = check_all(cfg, config.DEFAULT_ADDRESS, root, ctd)
    old = check_all(cfg, config.DEFAULT_ADDRESS, root, ctd, containerd_version="1.7.15")
    new = check_all(cfg, config.DEFAULT_ADDRESS, root, ctd, containerd_version="1.7.16")
    assert new == unchecked
    (added,) = set(old) - set(unchecked)
    assert is_warning(added) and "1.7.15" in added


def _check(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    ours = tmp_path / "ours.toml"
    ours.write_text("")
    ctd = tmp_path / "containerd.toml"
    ctd.write_text("version = 2\n")
    return snapshotter_cli(
        "--config", str(ours), "config", "check", "--containerd-config", str(ctd), *extra
    )


def test_config_check_warns_about_the_version_the_flag_gives(tmp_path: Path) -> None:
    old = _check(tmp_path, "--containerd-version", "1.7.15")
    warned = [line for line in old.stdout.splitlines() if "is older than 1.7.16" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: containerd 1.7.15 ")
    new = _check(tmp_path, "--containerd-version", "containerd containerd.io 1.7.27 05044ec")
    assert "is older than" not in new.stdout
    assert "--containerd-version" not in new.stdout


def test_config_check_reads_the_installed_containerd_without_the_flag(tmp_path: Path) -> None:
    # the same answer `containerd --version` gives this machine (or none at all)
    expected = check_containerd_version(config.Config(), installed_containerd_version())
    lines = _check(tmp_path).stdout.splitlines()
    version_lines = [
        line
        for line in lines
        if any(k in line for k in ("containerd's version", "is older than", "no version in"))
    ]
    assert version_lines == expected
