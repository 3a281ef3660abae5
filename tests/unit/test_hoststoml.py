"""`hosts.toml` merging for the registry mirror: the text rules on strings (ours first, the
operator's tables, comments and bytes kept, `server` added only when missing, idempotent,
unconfigure the exact inverse), the files (directories containerd reads, backups, atomic
writes, modes, links, deletion) and the command line (dry-run diffs, one line per error, no
file changed when any fails, exit statuses)."""

from __future__ import annotations

import io
import os
import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index.oci.hosts import HostsConfig
from snapshotter import cli as snap_cli
from snapshotter.errors import UsageError
from snapshotter.mirror import hoststoml as h
from tests.support.cli import snapshotter_cli

M = h.DEFAULT_MIRROR
HUB = "https://registry-1.docker.io"
SERVER_ADDED = f'server = "{HUB}"  {h.SERVER_COMMENT}\n'
OURS = '# sociable mirror\n[host."http://127.0.0.1:8472"]\n  capabilities = ["pull", "resolve"]\n'

HARBOR = """# operator file: docker.io through the pull-through caches
server = "https://registry-1.docker.io"

# harbor, first choice
[host."https://harbor.example"]
  capabilities = ["pull", "resolve"]
  [host."https://harbor.example".header]
    X-Project = ["cache"]

# then the other one
[host."https://cache.example:5000"]
  skip_verify = true
"""

SERVER_ONLY = f'server = "{HUB}"\n'

NO_SERVER = """[host."https://harbor.example"]
  capabilities = ["pull"]
"""

# Lines that look like headers, comments and our marker inside values.
TRICKY = '''title = """
[host."http://fake"]
# sociable mirror
"""
lit = \'\'\'[host."x"] # not a comment\'\'\'
client = [
  ["/a.cert", "/a.key"],
  ["/b.cert", ""],
]
[header]
  X-Hash = "#[host]"

[host."https://h.example"]
  ca = "ca.crt" # a trailing comment
'''

OUT_OF_ORDER = """[host."https://a.example"]
  capabilities = ["pull"]

[other]
x = 1

[host."https://b.example"]
  capabilities = ["pull"]
"""

CASES = {
    "none": "",
    "server only": SERVER_ONLY,
    "mirrors": HARBOR,
    "no server": NO_SERVER,
    "tricky": TRICKY,
    "out of order": OUT_OF_ORDER,
    "crlf": HARBOR.replace("\n", "\r\n"),
}


def configure(text: str | None, **kw: object) -> str:
    kw.setdefault("upstream", HUB)
    return h.configure_text(text, M, **kw)  # type: ignore[arg-type]


def host_order(text: str) -> list[str]:
    return list(tomllib.loads(text).get("host", {}))


def endpoints(tmp_path: Path, text: str, registry: str = "docker.io") -> list[str]:
    """The endpoint order the project's own hosts.toml reader (containerd's rules) sees."""
    d = tmp_path / "read" / registry
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    config = HostsConfig.load([tmp_path / "read"], registry)
    return [f"{e.scheme}://{e.host}" for e in config.endpoints()]


# -- the text --------------------------------------------------------------------------------


def test_no_file_gets_server_and_our_table() -> None:
    assert configure(None) == SERVER_ADDED + "\n" + OURS


def test_server_only_keeps_its_server_and_gains_our_table(tmp_path: Path) -> None:
    out = configure(SERVER_ONLY)
    assert out == SERVER_ONLY + "\n" + OURS
    assert endpoints(tmp_path, out) == [M, HUB]


def test_existing_mirrors_stay_after_ours_with_their_comments(tmp_path: Path) -> None:
    out = configure(HARBOR)
    assert out == HARBOR.replace("# harbor, first choice", OURS + "\n# harbor, first choice")
    assert host_order(out) == [M, "https://harbor.example", "https://cache.example:5000"]
    assert endpoints(tmp_path, out) == [
        M,
        "https://harbor.example",
        "https://cache.example:5000",
        HUB,
    ]
    assert tomllib.loads(out)["host"]["https://harbor.example"]["header"] == {
        "X-Project": ["cache"]
    }


def test_no_server_gets_one_marked_above_everything() -> None:
    out = configure(NO_SERVER)
    assert out == SERVER_ADDED + "\n" + OURS + "\n" + NO_SERVER
    assert tomllib.loads(out)["server"] == HUB


def test_default_directory_gets_no_server() -> None:
    assert configure(None, upstream=None) == OURS
    assert "server" not in tomllib.loads(configure(NO_SERVER, upstream=None))


def test_lines_that_only_look_like_headers_are_left_alone() -> None:
    out = configure(TRICKY)
    assert host_order(out) == [M, "https://h.example"]
    assert out.index(OURS) == out.index('[host."https://h.example"]') - len(OURS) - 1
    assert tomllib.loads(out)["title"] == '[host."http://fake"]\n# sociable mirror\n'


def test_out_of_order_tables_keep_their_order() -> None:
    out = configure(OUT_OF_ORDER, upstream=None)
    assert out == OURS + "\n" + OUT_OF_ORDER
    assert host_order(out) == [M, "https://a.example", "https://b.example"]


def test_crlf_file_stays_crlf() -> None:
    out = configure(CASES["crlf"])
    assert "\n" not in out.replace("\r\n", "")
    assert host_order(out)[0] == M


@pytest.mark.parametrize("name", CASES)
def test_configure_is_idempotent(name: str) -> None:
    once = configure(CASES[name])
    assert configure(once) == once


@pytest.mark.parametrize("name", CASES)
def test_unconfigure_gives_back_the_original_bytes(name: str) -> None:
    text = CASES[name]
    once = configure(text)
    assert once != text
    assert h.unconfigure_text(once, M) == text


def test_our_table_moves_to_the_front() -> None:
    text = NO_SERVER + "\n" + OURS
    out = configure(text, upstream=None)
    assert host_order(out) == [M, "https://harbor.example"]
    assert out.count("# sociable mirror") == 1


def test_a_marked_table_with_an_old_address_is_replaced() -> None:
    old = configure(HARBOR).replace("127.0.0.1:8472", "10.0.0.9:9000")
    out = configure(old)
    assert out == configure(HARBOR)
    assert "10.0.0.9" not in out


def test_an_unmarked_table_for_the_mirror_becomes_ours() -> None:
    text = NO_SERVER + '\n[host."http://127.0.0.1:8472/"]\n  capabilities = ["pull"]\n'
    out = configure(text, upstream=None)
    assert host_order(out) == [M, "https://harbor.example"]
    assert h.unconfigure_text(out, M) == NO_SERVER


def test_unconfigure_keeps_what_the_operator_added_later() -> None:
    out = configure(None) + '\n[host."https://new.example"]\n  capabilities = ["pull"]\n'
    back = h.unconfigure_text(out, M)
    assert back == '[host."https://new.example"]\n  capabilities = ["pull"]\n'
    assert h.unconfigure_text(configure(None), M) == ""


def test_unconfigure_keeps_a_server_the_operator_wrote() -> None:
    assert h.unconfigure_text(configure(SERVER_ONLY), M) == SERVER_ONLY


def test_dial_timeout_only_in_our_table() -> None:
    out = configure(HARBOR, dial_timeout="1s")
    hosts = tomllib.loads(out)["host"]
    assert hosts[M] == {"capabilities": ["pull", "resolve"], "dial_timeout": "1s"}
    assert "dial_timeout" not in hosts["https://harbor.example"]
    assert configure(out) == configure(HARBOR)  # dropped when the containerd does not read it
    assert h.unconfigure_text(out, M) == HARBOR


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('server = "x"\n[host."a"\n', "not valid TOML"),
        ("host = 3\n", 'host must be [host."URL"] tables'),
        ("server = 1\n", "server must be a string"),
        ('host."https://a".capabilities = ["pull"]\n', "its own [host"),
        ('[host]\n"https://a" = { capabilities = ["pull"] }\n', "its own [host"),
    ],
)
def test_files_that_cannot_be_merged(text: str, words: str) -> None:
    with pytest.raises(h.HostsFileError, match=r"^where/hosts.toml: .*") as e:
        h.configure_text(text, M, upstream=HUB, where="where/hosts.toml")
    assert words in str(e.value) and "\n" not in str(e.value)


# Random files made of the pieces operators write, to check the three rules on each.
_URLS = st.sampled_from(
    ["https://a.example", "https://b.example:5000", "http://10.0.0.7", "https://c.example/v2"]
)
_COMMENTS = st.lists(st.sampled_from(["# a\n", "#\n", "  # indented\n"]), max_size=2)
_BLANKS = st.sampled_from(["", "\n", "\n\n"])


@st.composite
def _hosts_files(draw: st.DrawFn) -> str:
    out = "".join(draw(_COMMENTS))
    if draw(st.booleans()):
        out += 'server = "https://up.example"\n'
    if draw(st.booleans()):
        out += "skip_verify = false # top level\n"
    for url in draw(st.lists(_URLS, unique=True, max_size=3)):
        out += draw(_BLANKS) + "".join(draw(_COMMENTS)) + f'[host."{url}"]\n'
        out += draw(st.sampled_from(['  capabilities = ["pull"]\n', "", "  skip_verify = true\n"]))
        if draw(st.booleans()):
            out += f'  [host."{url}".header]\n  X-A = "1"\n'
    if draw(st.booleans()):
        out += draw(_BLANKS) + "[other]\nk = [\n  1,\n]\n"
    return out + draw(_BLANKS)


@settings(max_examples=200, deadline=None)
@given(_hosts_files(), st.sampled_from([None, HUB]))
def test_random_files_keep_every_rule(text: str, upstream: str | None) -> None:
    before = tomllib.loads(text)
    out = h.configure_text(text, M, upstream=upstream)
    after = tomllib.loads(out)
    assert next(iter(after["host"])) == M
    assert list(after["host"])[1:] == list(before.get("host", {}))
    for key, value in before.items():
        if key != "host":
            assert after[key] == value
    assert h.configure_text(out, M, upstream=upstream) == out
    assert h.unconfigure_text(out, M) == text


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "server"),
    [
        ("docker.io", HUB),
        ("ghcr.io", "https://ghcr.io"),
        ("10.0.0.5:5000", "https://10.0.0.5:5000"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("localhost:5000", "http://localhost:5000"),
    ],
)
def test_upstream_server(registry: str, server: str) -> None:
    assert h.upstream_server(h.check_registry(registry)) == server


@pytest.mark.parametrize(
    "bad", ["https://docker.io", "docker.io/library", "", "_default", "a b", "-x.io"]
)
def test_bad_registry_names(bad: str) -> None:
    with pytest.raises(UsageError):
        h.check_registry(bad)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8472/", "http://127.0.0.1:8472"),
        ("https://[fd00::1]:8472", "https://[fd00::1]:8472"),
        ("127.0.0.1:8472", None),
        ("ftp://x", None),
        ("http://u:p@x", None),
        ("http://x/?a=1", None),
        ("http://x:99999", None),
    ],
)
def test_check_mirror(url: str, ok: str | None) -> None:
    if ok is None:
        with pytest.raises(UsageError):
            h.check_mirror(url)
    else:
        assert h.check_mirror(url) == ok


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("0.0.0.0:8472", "http://127.0.0.1:8472"),
        ("[::]:9000", "http://[::1]:9000"),
        ("10.0.0.5:8472", "http://10.0.0.5:8472"),
    ],
)
def test_default_mirror_follows_the_listener(listen: str, url: str) -> None:
    assert h.default_mirror(listen) == url


def test_configure_dir_is_the_one_containerd_reads(tmp_path: Path) -> None:
    assert h.configure_dir(tmp_path, "10.0.0.5:5000") == tmp_path / "10.0.0.5:5000"
    (tmp_path / "10.0.0.5_5000_").mkdir()
    assert h.configure_dir(tmp_path, "10.0.0.5:5000") == tmp_path / "10.0.0.5_5000_"
    assert h.configure_dir(tmp_path, "docker.io") == tmp_path / "docker.io"
    assert h.configure_dir(tmp_path, "_default") == tmp_path / "_default"


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", (1, 6)),
        ("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da", (1, 7)),
        ("containerd github.com/containerd/containerd/v2 v2.1.3 c787fb98", (2, 1)),
        ("containerd github.com/containerd/containerd/v2 v2.0.5 fb4c30d4", (2, 0)),
        ("", None),
        ("containerd version unknown", None),
    ],
)
def test_containerd_versions(text: str, version: tuple[int, int] | None) -> None:
    assert h.parse_containerd_version(text) == version
    expect = "1s" if version is not None and version >= (2, 1) else None
    assert h.dial_timeout_for(version) == expect


def test_installed_containerd_version_or_none(tmp_path: Path) -> None:
    fake = tmp_path / "containerd-fake"
    fake.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd/v2 v2.1.3 x'\n")
    fake.chmod(0o755)
    assert h.containerd_version(str(fake)) == (2, 1)
    assert h.containerd_version(str(tmp_path / "absent")) is None


# -- files and the command -------------------------------------------------------------------


def command(
    tmp_path: Path, name: str, *registries: str, default: bool = False, **kw: object
) -> tuple[int, str, str, list[Exception]]:
    """run_mirror_command in process: (status, stdout, stderr, the errors it reported)."""
    out, err = io.StringIO(), io.StringIO()
    reported: list[Exception] = []

    def report(e: Exception) -> int:
        reported.append(e)
        return snap_cli._report_error(e)

    kw.setdefault("mirror", M)
    kw.setdefault("dry_run", False)
    kw.setdefault("containerd", str(tmp_path / "no-containerd"))
    code = h.run_mirror_command(
        name,  # type: ignore[arg-type]
        hosts_dir=tmp_path / "certs.d",
        registries=registries,
        default=default,
        report_error=report,
        out=out,
        err=err,
        **kw,  # type: ignore[arg-type]
    )
    return code, out.getvalue(), err.getvalue(), reported


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_configure_creates_merges_and_backs_up(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(HARBOR)
    code, out, err, _ = command(tmp_path, "configure", "docker.io", "10.0.0.5:5000", default=True)
    assert code == 0 and err == ""
    hub = certs / "docker.io" / "hosts.toml"
    assert out.splitlines() == [
        f"updated {hub} (backup {hub}.bak)",
        f"created {certs / '10.0.0.5:5000' / 'hosts.toml'}",
        f"created {certs / '_default' / 'hosts.toml'}",
    ]
    assert tree(certs) == {
        "docker.io/hosts.toml": configure(HARBOR).encode(),
        "docker.io/hosts.toml.bak": HARBOR.encode(),
        "10.0.0.5:5000/hosts.toml": configure(None, upstream="https://10.0.0.5:5000").encode(),
        "_default/hosts.toml": OURS.encode(),
    }
    for p in certs.rglob("hosts.toml"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert not list(certs.rglob(".tmp-*"))
    # Configuring again changes nothing, and writes no backup of our own output.
    before = {p: p.stat().st_mtime_ns for p in certs.rglob("*")}
    code, out, _, _ = command(tmp_path, "configure", "docker.io", "10.0.0.5:5000", default=True)
    assert code == 0 and all(line.startswith("unchanged ") for line in out.splitlines())
    assert {p: p.stat().st_mtime_ns for p in certs.rglob("*")} == before


def test_a_file_that_is_only_ours_is_rewritten_without_backup(tmp_path: Path) -> None:
    command(tmp_path, "configure", "ghcr.io")
    code, out, _, _ = command(tmp_path, "configure", "ghcr.io", mirror="http://10.1.1.1:8472")
    path = tmp_path / "certs.d" / "ghcr.io" / "hosts.toml"
    assert code == 0 and out == f"updated {path}\n"
    assert not path.with_name("hosts.toml.bak").exists()
    assert host_order(path.read_text()) == ["http://10.1.1.1:8472"]


def test_unconfigure_restores_and_deletes(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(HARBOR)
    (certs / "quay.io").mkdir()
    (certs / "quay.io" / "ca.pem").write_text("not a docker cert name")
    command(tmp_path, "configure", "docker.io", "ghcr.io", "quay.io", default=True)
    code, out, _, _ = command(tmp_path, "unconfigure")  # no names: every directory
    assert code == 0
    assert sorted(out.splitlines()) == sorted(
        [
            f"updated {certs / 'docker.io' / 'hosts.toml'} (backup {certs / 'docker.io' / 'hosts.toml.bak'})",
            f"deleted {certs / 'ghcr.io' / 'hosts.toml'}",
            f"deleted {certs / 'quay.io' / 'hosts.toml'}",
            f"deleted {certs / '_default' / 'hosts.toml'}",
        ]
    )
    assert (certs / "docker.io" / "hosts.toml").read_text() == HARBOR
    assert not (certs / "ghcr.io").exists() and not (certs / "_default").exists()
    assert [p.name for p in (certs / "quay.io").iterdir()] == ["ca.pem"]
    code, out, _, _ = command(tmp_path, "unconfigure", "docker.io")
    assert code == 0 and out == f"nothing to unconfigure under {certs}\n"


def test_unconfigure_only_the_named_registries(tmp_path: Path) -> None:
    command(tmp_path, "configure", "docker.io", "ghcr.io")
    code, _, _, _ = command(tmp_path, "unconfigure", "ghcr.io")
    assert code == 0
    assert sorted(tree(tmp_path / "certs.d")) == ["docker.io/hosts.toml"]


def test_dry_run_prints_diffs_and_changes_nothing(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(HARBOR)
    before = tree(certs)
    code, out, _, _ = command(tmp_path, "configure", "docker.io", "ghcr.io", dry_run=True)
    assert code == 0 and tree(certs) == before and not (certs / "ghcr.io").exists()
    hub = certs / "docker.io" / "hosts.toml"
    ghcr = certs / "ghcr.io" / "hosts.toml"
    assert f"--- {hub}\n+++ {hub}\n" in out
    assert f"--- /dev/null\n+++ {ghcr}\n" in out
    added = [line[1:] for line in out.splitlines(keepends=True) if line.startswith("+")]
    assert "".join(added).count("# sociable mirror\n") == 2
    assert not [line for line in out.splitlines() if line.startswith("-") and "---" not in line]
    command(tmp_path, "configure", "docker.io", "ghcr.io")
    code, out, _, _ = command(tmp_path, "unconfigure", dry_run=True)
    assert code == 0 and f"--- {ghcr}\n+++ /dev/null\n" in out and ghcr.exists()
    code, out, _, _ = command(tmp_path, "configure", "docker.io", dry_run=True)
    assert code == 0 and out == ""


def test_mode_is_kept_and_links_are_written_through(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    real = tmp_path / "managed-hosts.toml"
    real.write_text(SERVER_ONLY)
    real.chmod(0o600)
    (certs / "docker.io" / "hosts.toml").symlink_to(real)
    code, _, _, _ = command(tmp_path, "configure", "docker.io")
    assert code == 0
    assert (certs / "docker.io" / "hosts.toml").is_symlink()
    assert real.read_text() == configure(SERVER_ONLY)
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


def test_dial_timeout_written_for_a_containerd_that_reads_it(tmp_path: Path) -> None:
    fake = tmp_path / "containerd-2.1"
    fake.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd/v2 v2.1.0 x'\n")
    fake.chmod(0o755)
    command(tmp_path, "configure", "docker.io", containerd=str(fake))
    text = (tmp_path / "certs.d" / "docker.io" / "hosts.toml").read_text()
    assert tomllib.loads(text)["host"][M]["dial_timeout"] == h.DIAL_TIMEOUT


def test_a_new_directory_hiding_default_is_a_warning(tmp_path: Path) -> None:
    command(tmp_path, "configure", default=True)
    code, _, err, _ = command(tmp_path, "configure", "ghcr.io")
    assert code == 0
    assert err.startswith("warning: ") and "_default" in err and err.count("\n") == 1


def test_every_error_is_one_line_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs.d"
    for name, content in [("docker.io", 'server = "x"\n[host."a"\n'), ("ghcr.io", "host = 1\n")]:
        (certs / name).mkdir(parents=True)
        (certs / name / "hosts.toml").write_text(content)
    (certs / "quay.io").write_text("a file")
    (certs / "nvcr.io" / "hosts.toml").mkdir(parents=True)
    (certs / "bad-utf8.io").mkdir()
    (certs / "bad-utf8.io" / "hosts.toml").write_bytes(b'server = "\xff"\n')
    (certs / "certs.io").mkdir()
    (certs / "certs.io" / "ca.crt").write_text("pem")
    before = tree(certs)
    names = ["docker.io", "ghcr.io", "quay.io", "nvcr.io", "bad-utf8.io", "certs.io", "ok.io"]
    code, out, _, reported = command(tmp_path, "configure", *names)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and out == ""
    assert tree(certs) == before and not (certs / "ok.io").exists()
    assert len(err) == 6 and all(line.startswith("sociable-snapshotter: error: ") for line in err)
    by_name = dict(zip(names, err, strict=False))
    assert "docker.io/hosts.toml: not valid TOML" in by_name["docker.io"]
    assert 'host must be [host."URL"] tables' in by_name["ghcr.io"]
    assert by_name["quay.io"].endswith(f"{certs / 'quay.io'}: Not a directory")
    assert "nvcr.io/hosts.toml: Is a directory" in by_name["nvcr.io"]
    assert "not UTF-8" in by_name["bad-utf8.io"]
    assert "ca.crt" in by_name["certs.io"]
    codes = [snap_cli._report_error(e) for e in reported]
    capsys.readouterr()
    assert codes == [2, 2, 6, 6, 2, 2]


CLI_ERRORS = [
    ("hosts dir is a file", ["configure", "--registry", "docker.io"], 6, "Not a directory"),
    ("no registry", ["configure"], 2, "--registry or --default"),
    ("bad registry", ["configure", "--registry", "https://x"], 2, "not a registry host"),
    ("bad mirror", ["configure", "--default", "--mirror", "x:1"], 2, "--mirror"),
    ("unknown flag", ["configure", "--registries", "x"], 2, "--registries"),
]


@pytest.mark.parametrize(
    ("argv", "code", "words"), [pytest.param(a, c, w, id=n) for n, a, c, w in CLI_ERRORS]
)
def test_command_line_errors(tmp_path: Path, argv: list[str], code: int, words: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    hosts_file = tmp_path / "certs.d"
    hosts_file.write_text("")
    r = snapshotter_cli(
        "--config", str(config), "mirror", argv[0], "--hosts-dir", str(hosts_file), *argv[1:]
    )
    assert r.returncode == code, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("sociable-snapshotter: error: ") and words in line
    assert hosts_file.read_text() == ""


def test_command_line_round_trip(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[peers]\nlisten = "0.0.0.0:9999"\n')
    certs = tmp_path / "certs.d"
    base = ["--config", str(config), "mirror"]
    r = snapshotter_cli(
        *base, "configure", "--hosts-dir", str(certs), "--registry", "docker.io", "ghcr.io"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("created ") == 2
    text = (certs / "docker.io" / "hosts.toml").read_text()
    assert host_order(text) == ["http://127.0.0.1:9999"]
    r = snapshotter_cli(*base, "unconfigure", "--hosts-dir", str(certs), "--registry", "docker.io")
    assert r.returncode == 0, r.stderr
    assert not (certs / "docker.io").exists() and (certs / "ghcr.io" / "hosts.toml").exists()
    assert os.listdir(certs) == ["ghcr.io"]
