"""Every user error of both command lines is one line on stderr with the documented exit
status, never a traceback; a bug is one line saying so (the traceback only with --debug)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from index import cli as sociable_cli
from snapshotter import cli as snap_cli
from snapshotter.daemon import AddressInUse
from snapshotter.errors import ConfigError
from snapshotter.rootlock import RootLocked
from tests.support import images
from tests.support.cli import snapshotter_cli, sociable


class Store:
    """A local store holding the v1 index and zTOCs of the busybox image, and its layers."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.image = images.busybox_image(base / "layout", tag="v1")
        created = sociable(
            "create",
            "--min-layer-size",
            "0",
            "--span-size",
            "65536",
            f"oci-layout:{self.image.layout}:v1",
            root=self.root,
        )
        self.index = created.stdout.split()[0]
        listing = sociable("ztoc", "list", root=self.root).stdout.splitlines()[1:]
        by_layer = {row.split()[2]: row.split()[0] for row in listing}
        self.ztoc = by_layer[self.image.layers[1].digest]  # the features layer
        self.layer = self.image.layers[1].path
        self.other_layer = self.image.layers[0].path
        self.truncated = base / "truncated"
        self.truncated.write_bytes(self.layer.read_bytes()[:1000])
        corrupt = bytearray(self.layer.read_bytes())
        for i in range(200, len(corrupt), 997):
            corrupt[i] ^= 0xFF
        self.corrupt = base / "corrupt"
        self.corrupt.write_bytes(bytes(corrupt))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("cli-errors"))


UNKNOWN = "sha256:" + "0" * 64

# (name, argv given the store, exit status, words the one line must contain)
SOCIABLE_CASES: list[tuple[str, Callable[[Store], list[str]], int, list[str]]] = [
    ("unknown option", lambda s: ["--layer-file", "/nonexistent"], 2, ["invalid choice"]),
    ("missing operand", lambda s: ["ztoc", "info"], 2, ["digest"]),
    ("bad digest", lambda s: ["ztoc", "info", "sha256:abc"], 2, ["sha256:abc"]),
    (
        "ztoc info of an index",
        lambda s: ["ztoc", "info", s.index],
        2,
        ["is a SOCI index, not a zTOC"],
    ),
    (
        "index info of a zTOC",
        lambda s: ["index", "info", s.ztoc],
        2,
        ["is a zTOC, not a SOCI index"],
    ),
    ("unknown zTOC", lambda s: ["ztoc", "info", UNKNOWN], 3, [UNKNOWN, "not in the local store"]),
    ("unknown index", lambda s: ["index", "rm", UNKNOWN], 3, [UNKNOWN]),
    ("nothing to remove", lambda s: ["index", "rm"], 2, ["nothing to remove"]),
    (
        "missing layout",
        lambda s: ["create", "oci-layout:/nonexistent/layout:v1"],
        3,
        ["/nonexistent/layout", "does not exist"],
    ),
    (
        "path not in the layer",
        lambda s: ["ztoc", "get-file", s.ztoc, "no/such/file", "--layer-file", str(s.layer)],
        3,
        ["no/such/file", "no entry"],
    ),
    (
        "a directory",
        lambda s: ["ztoc", "get-file", s.ztoc, "data", "--layer-file", str(s.layer)],
        3,
        ["'data'", "not a file"],
    ),
    (
        "missing layer file",
        lambda s: ["ztoc", "get-file", s.ztoc, "data/hello.txt", "--layer-file", "/nonexistent"],
        3,
        ["--layer-file /nonexistent", "No such file"],
    ),
    (
        "wrong layer file",
        lambda s: [
            "ztoc",
            "get-file",
            s.ztoc,
            "data/hello.txt",
            "--layer-file",
            str(s.other_layer),
        ],
        4,
        ["bytes, but zTOC", "not that layer's blob"],
    ),
    (
        "truncated layer file",
        lambda s: ["ztoc", "get-file", s.ztoc, "data/big.bin", "--layer-file", str(s.truncated)],
        4,
        ["truncated", "1000 bytes"],
    ),
    (
        "corrupt layer file",
        lambda s: ["ztoc", "get-file", s.ztoc, "data/big.bin", "--layer-file", str(s.corrupt)],
        4,
        ["corrupt", "digest mismatch"],
    ),
    (
        "unwritable output",
        lambda s: [
            "ztoc",
            "get-file",
            s.ztoc,
            "data/hello.txt",
            "--layer-file",
            str(s.layer),
            "-o",
            "/nonexistent/out",
        ],
        3,
        ["--output /nonexistent/out"],
    ),
    (
        "get-file without a layer source",
        lambda s: ["ztoc", "get-file", s.ztoc, "data/hello.txt"],
        2,
        ["--image", "--layer-file"],
    ),
]


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [pytest.param(a, c, w, id=n) for n, a, c, w in SOCIABLE_CASES],
)
def test_sociable_user_errors(
    store: Store, argv: Callable[[Store], list[str]], code: int, words: list[str]
) -> None:
    r = sociable(*argv(store), root=store.root, check=False)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("sociable: error: ")
    for w in words:
        assert w in line


def test_get_file_works_as_the_errors_assume(store: Store) -> None:
    """The cases above fail for the stated reason: the same command with good input works."""
    r = sociable(
        "ztoc",
        "get-file",
        store.ztoc,
        "data/hello.txt",
        "--layer-file",
        str(store.layer),
        root=store.root,
    )
    assert r.stdout == "hello from layer 2\n"
    info = json.loads(sociable("ztoc", "info", store.ztoc, root=store.root).stdout)
    assert info["num_files"] > 0


SNAPSHOTTER_CASES: list[tuple[str, Callable[[Path], list[str]], int, list[str]]] = [
    ("unknown option", lambda d: ["--bogus"], 2, ["--bogus"]),
    (
        "missing config",
        lambda d: ["--config", str(d / "no.toml"), "config", "check"],
        2,
        ["no.toml", "does not exist"],
    ),
    (
        "fd:// without activation",
        lambda d: ["--root", str(d / "root"), "--address", "fd://"],
        2,
        ["fd://", "LISTEN_FDS"],
    ),
    (
        "root not creatable",
        lambda d: ["--root", "/proc/sociable-root", "--address", str(d / "s.sock")],
        6,
        ["/proc/sociable-root"],
    ),
]


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [pytest.param(a, c, w, id=n) for n, a, c, w in SNAPSHOTTER_CASES],
)
def test_snapshotter_user_errors(
    tmp_path: Path, argv: Callable[[Path], list[str]], code: int, words: list[str]
) -> None:
    r = snapshotter_cli(*argv(tmp_path))
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("sociable-snapshotter: error: ")
    for w in words:
        assert w in line


# --- the one exit point, in process ---------------------------------------------------------------


def _boom(args: argparse.Namespace, console: object) -> None:
    raise RuntimeError("boom")


def _interrupt(args: argparse.Namespace, console: object) -> None:
    raise KeyboardInterrupt


def _run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        sociable_cli.main(argv)
    assert isinstance(exc.value.code, int)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("debug", [False, True])
def test_sociable_bug_is_one_line_unless_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, debug: bool
) -> None:
    monkeypatch.delenv("SOCIABLE_DEBUG", raising=False)
    monkeypatch.setattr(sociable_cli, "cmd_index_list", _boom)
    argv = ["--root", str(tmp_path), *(["--debug"] if debug else []), "index", "list"]
    code, err = _run_main(capsys, argv)
    assert code == 1
    last = err.splitlines()[-1]
    assert last.startswith("sociable: error: unexpected RuntimeError: boom (this is a bug")
    if debug:
        assert "Traceback" in err and "_boom" in err
    else:
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "SOCIABLE_DEBUG=1" in last


def test_sociable_debug_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("SOCIABLE_DEBUG", "1")
    monkeypatch.setattr(sociable_cli, "cmd_index_list", _boom)
    code, err = _run_main(capsys, ["--root", str(tmp_path), "index", "list"])
    assert code == 1 and "Traceback" in err


def test_sociable_ctrl_c_is_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(sociable_cli, "cmd_index_list", _interrupt)
    code, err = _run_main(capsys, ["--root", str(tmp_path), "index", "list"])
    assert code == 130 and err == "sociable: error: interrupted\n"


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            ExceptionGroup(
                "serve",
                [ExceptionGroup("mounter", [AddressInUse("address 'x' is in use by pid 7")])],
            ),
            3,
            "address 'x' is in use by pid 7",
        ),
        (RootLocked("root /r is in use by another sociable-snapshotter (pid 9)"), 3, "pid 9"),
        (ConfigError("bad value"), 2, "bad value"),
        (
            ExceptionGroup("two", [ConfigError("first"), ValueError("second")]),
            2,
            "first (and 1 more errors)",
        ),
        (FileNotFoundError(2, "No such file or directory", "/x/y"), 6, "/x/y: No such file"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("boom"), 1, "unexpected RuntimeError: boom (this is a bug"),
    ],
)
def test_snapshotter_exit_point(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    code: int,
    line: str,
) -> None:
    monkeypatch.delenv("SOCIABLE_DEBUG", raising=False)

    def run(argv: object) -> int:
        raise error

    monkeypatch.setattr(snap_cli, "run", run)
    with pytest.raises(SystemExit) as exc:
        snap_cli.main([])
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("sociable-snapshotter: error: ") and line in err
