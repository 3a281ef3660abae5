"""The `hosts.toml` files `mirror configure` writes, read by the real containerd (Debian 1.6).

A private containerd, a local registry with one small image per test, and
`ctr --debug images pull --hosts-dir` (the client resolves and fetches, so its debug log names
every request it makes, in order):

- our mirror answering 404 to everything (a loopback stub that records its requests) is asked
  first for every request, with `?ns=<registry>`, then the operator's mirror after it, then
  the registry, which serves the image;
- our mirror not listening (a closed port): the pull still succeeds from the registry;
- a file with `dial_timeout` (what `configure` writes for containerd 2.1+) is read by 1.6 and
  its hosts used; a file 1.6 refuses (an unknown capability) is logged "failed to decode" and
  its hosts are never asked, which shows that "the stub was asked" means "the file was read";
- unconfigure gives the operator's file back and containerd goes straight to its mirror.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from snapshotter.mirror import hoststoml
from tests.support import images
from tests.support.cli import snapshotter_cli
from tests.support.containerd import CTR_BIN, Containerd, capabilities, start_containerd
from tests.support.registry import RegistryServer, free_port

pytestmark = pytest.mark.root


@dataclass
class Stub:
    """An HTTP server on loopback answering 404 to every request; `requests` records
    (method, path with query) in arrival order."""

    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def stub_server() -> Iterator[Stub]:
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _not_found(self) -> None:
            seen.append((self.command, self.path))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _not_found

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Stub(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    caps = capabilities()
    missing = [
        name
        for name, ok in [
            ("root", caps.root),
            ("overlay", caps.overlay),
            ("containerd", caps.containerd),
            ("skopeo", caps.skopeo),
            ("docker-registry", caps.registry),
        ]
        if not ok
    ]
    if missing:
        pytest.skip(f"PREREQUISITE MISSING for containerd tests: {', '.join(missing)}")
    with start_containerd(tmp_path_factory.mktemp("ctd-hosts"), proxy_address=None) as ctd:
        yield ctd


@dataclass(frozen=True)
class Pushed:
    ref: str
    repo: str
    image: images.Image


def push_image(registry: RegistryServer, tmp_path: Path, name: str) -> Pushed:
    """A one-layer image unique to the test, pushed as `hoststoml/<name>:v1`."""
    layer = [images.File(path="case.txt", data=f"hosts.toml case {name}\n".encode())]
    image = images.write_oci_layout(tmp_path / f"layout-{name}", [layer], tag="v1")
    repo = f"hoststoml/{name}"
    return Pushed(images.push(image, registry.host, repo, "v1"), repo, image)


@dataclass(frozen=True)
class Request:
    method: str
    url: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


def pull(
    containerd: Containerd, hosts_dir: Path, ref: str, *, plain_http: bool = False
) -> tuple[list[Request], str]:
    """`ctr --debug images pull --hosts-dir` (without `plain_http` the scheme can only come
    from the file); returns the requests in the order ctr made them, and its log."""
    flags = ["--plain-http"] if plain_http else []
    hosts = ["--hosts-dir", str(hosts_dir)]
    done = containerd.ctr(
        "--debug", "images", "pull", *flags, *hosts, "--snapshotter=overlayfs", ref
    )
    requests = []
    for line in done.stderr.splitlines():
        method = re.search(r"request\.method=(\w+)", line)
        url = re.search(r' url="([^"]+)"', line)
        if 'msg="do request"' in line and method and url:
            requests.append(Request(method.group(1), url.group(1)))
    return requests, done.stderr


def served_by_registry(log: str, registry: RegistryServer) -> set[str]:
    """Paths the registry answered 200 in the log."""
    out = set()
    for line in log.splitlines():
        if 'msg="fetch response received"' in line and 'response.status="200 OK"' in line:
            m = re.search(r' url="([^"]+)"', line)
            if m and urlsplit(m.group(1)).netloc == registry.host:
                out.add(urlsplit(m.group(1)).path)
    return out


def image_pulled(containerd: Containerd, pushed: Pushed) -> None:
    """The image is in containerd, with the layer bytes the registry holds."""
    assert pushed.ref in containerd.ctr("images", "ls", "-q").stdout.split()
    [layer] = pushed.image.layers
    got = subprocess.run(
        [CTR_BIN, "--address", str(containerd.address), "content", "get", layer.digest],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    blob = pushed.image.layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
    assert got == blob.read_bytes()


def configure(hosts_dir: Path, registry: str, mirror: str, tmp_path: Path) -> str:
    config = tmp_path / "sociable.toml"
    config.write_text("")
    r = snapshotter_cli(
        "--config",
        str(config),
        "mirror",
        "configure",
        "--hosts-dir",
        str(hosts_dir),
        "--mirror",
        mirror,
        "--registry",
        registry,
    )
    assert r.returncode == 0, r.stderr
    return (hosts_dir / registry / "hosts.toml").read_text()


def test_our_mirror_is_asked_first_then_the_operators_then_the_registry(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    pushed = push_image(registry, tmp_path, "first")
    after = push_image(registry, tmp_path, "unconfigured")
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / registry.host).mkdir(parents=True)
    hosts_file = hosts_dir / registry.host / "hosts.toml"
    with stub_server() as ours, stub_server() as operators:
        original = (
            f'server = "{registry.url}"\n\n# the operator\'s cache\n'
            f'[host."{operators.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        hosts_file.write_text(original)
        text = configure(hosts_dir, registry.host, ours.url, tmp_path)
        assert text.index(ours.url) < text.index(operators.url)
        requests, log = pull(containerd, hosts_dir, pushed.ref)
        asked_before = len(ours.requests)

        r = snapshotter_cli(
            "--config", str(tmp_path / "sociable.toml"), "mirror", "unconfigure",
            "--hosts-dir", str(hosts_dir), "--mirror", ours.url,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert hosts_file.read_text() == original
        requests_after, _ = pull(containerd, hosts_dir, after.ref)

    assert "failed to decode" not in log
    image_pulled(containerd, pushed)
    hosts = {ours.url: "ours", operators.url: "operator", registry.url: "registry"}
    order = [(hosts.get(f"http://{r.host}", r.host), r.method, r.path) for r in requests]
    assert order[0][0] == "ours"
    # Every path the registry was asked for was asked of ours, then the operator's, before.
    registry_paths = [(m, p) for who, m, p in order if who == "registry"]
    assert len(registry_paths) >= 4  # HEAD tag, manifest, config, layer
    for method, path in registry_paths:
        asked = [who for who, m, p in order if (m, p) == (method, path)]
        assert asked == ["ours", "operator", "registry"], (method, path, order)
    # The stub saw the same requests, each with ?ns=<registry>.
    assert asked_before == len(registry_paths)
    ns = registry.host.replace(":", "%3A")
    assert ours.requests[0] == ("HEAD", f"/v2/{pushed.repo}/manifests/v1?ns={ns}")
    for _, path in ours.requests:
        assert parse_qs(urlsplit(path).query) == {"ns": [registry.host]}
        assert urlsplit(path).path.startswith(f"/v2/{pushed.repo}/")
    assert served_by_registry(log, registry) >= {
        f"/v2/{pushed.repo}/blobs/{pushed.image.layers[0].digest}",
        f"/v2/{pushed.repo}/blobs/{pushed.image.config_digest}",
    }
    # Unconfigured: the operator's cache is first again and ours is not asked.
    assert len(ours.requests) == asked_before
    assert requests_after[0].url.startswith(operators.url + "/v2/")
    image_pulled(containerd, after)


def test_a_mirror_that_is_not_listening_is_skipped(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    pushed = push_image(registry, tmp_path, "closed")
    hosts_dir = tmp_path / "certs.d"
    closed = f"http://127.0.0.1:{free_port()}"
    configure(hosts_dir, registry.host, closed, tmp_path)
    requests, log = pull(containerd, hosts_dir, pushed.ref)
    image_pulled(containerd, pushed)
    assert requests[0].url.startswith(closed + "/v2/")
    assert "connection refused" in log
    assert served_by_registry(log, registry) >= {
        f"/v2/{pushed.repo}/blobs/{pushed.image.layers[0].digest}"
    }


def test_containerd_1_6_reads_a_file_with_dial_timeout(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    pushed = push_image(registry, tmp_path, "dial")
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / registry.host).mkdir(parents=True)
    with stub_server() as ours:
        text = hoststoml.configure_text(
            None, ours.url, upstream=registry.url, dial_timeout=hoststoml.DIAL_TIMEOUT
        )
        assert 'dial_timeout = "1s"' in text
        (hosts_dir / registry.host / "hosts.toml").write_text(text)
        _, log = pull(containerd, hosts_dir, pushed.ref)
    assert "failed to decode" not in log
    assert len(ours.requests) >= 4
    image_pulled(containerd, pushed)


def test_a_file_containerd_refuses_is_never_asked(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    """The control: when 1.6 cannot parse a file it logs it and pulls without it."""
    pushed = push_image(registry, tmp_path, "refused")
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / registry.host).mkdir(parents=True)
    with stub_server() as ours:
        text = hoststoml.configure_text(None, ours.url, upstream=registry.url)
        (hosts_dir / registry.host / "hosts.toml").write_text(
            text.replace('["pull", "resolve"]', '["pull", "resolve", "teleport"]')
        )
        requests, log = pull(containerd, hosts_dir, pushed.ref, plain_http=True)
    assert "failed to decode" in log
    assert ours.requests == []
    assert {r.host for r in requests} == {registry.host}
    image_pulled(containerd, pushed)
