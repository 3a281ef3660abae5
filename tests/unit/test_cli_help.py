"""Both command lines document themselves: every option, operand and subcommand has help
text, `--version` answers, and `config check` warnings do not fail it."""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest

from index import cli as sociable_cli
from snapshotter import cli as snap_cli
from tests.support.cli import snapshotter_cli, sociable


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                if sub.prog.split()[-1] not in helped:
                    yield f"{path} {name}", action
                yield from _walk(sub, f"{path} {name}")
        elif not action.help and not isinstance(action, argparse._HelpAction):
            yield f"{path} {'/'.join(action.option_strings) or action.dest}", action


@pytest.mark.parametrize(
    "parser", [sociable_cli.parser(), snap_cli._parser()], ids=["sociable", "snapshotter"]
)
def test_every_option_and_subcommand_has_help(parser: argparse.ArgumentParser) -> None:
    missing = [where for where, _ in _walk(parser, parser.prog)]
    assert missing == []


def test_walk_finds_a_missing_help() -> None:
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--documented", help="yes")
    p.add_argument("--bare")
    sub = p.add_subparsers(dest="c")
    sub.add_parser("quiet").add_argument("--inner")
    assert [w for w, _ in _walk(p, "x")] == ["x --bare", "x quiet", "x quiet --inner"]


def test_version(tmp_path: Path) -> None:
    version = importlib.metadata.version("sociable")
    r = sociable("--version", root=tmp_path)
    assert r.stdout == f"sociable {version}\n"
    s = snapshotter_cli("--version")
    assert s.returncode == 0 and s.stdout == f"sociable-snapshotter {version}\n"


GOOD_V2 = """version = 2
[proxy_plugins.sociable]
  type = "snapshot"
  address = "/run/sociable/sociable.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "sociable"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"""


def test_config_check_passes_with_warnings_before_containerd_made_its_dir(
    tmp_path: Path,
) -> None:
    ours = tmp_path / "ours.toml"
    ours.write_text("")
    ctd = tmp_path / "containerd.toml"
    ctd.write_text(f'root = "{tmp_path / "ctd-root"}"\n' + GOOD_V2)
    r = snapshotter_cli(
        "--config",
        str(ours),
        "config",
        "check",
        "--containerd-config",
        str(ctd),
        "--containerd-version",
        "1.7.16",
    )
    assert r.returncode == 0, r.stdout
    warning, ok = r.stdout.splitlines()
    assert warning.startswith("warning: ") and "io.containerd.snapshotter.v1.sociable" in warning
    assert ok.startswith("ok: ") and "(1 warnings)" in ok
    # An error still fails it.
    ctd.write_text(ctd.read_text().replace('snapshotter = "sociable"', 'snapshotter = "x"'))
    bad = snapshotter_cli("--config", str(ours), "config", "check", "--containerd-config", str(ctd))
    assert bad.returncode == 1
    assert not any(line.startswith("ok:") for line in bad.stdout.splitlines())
