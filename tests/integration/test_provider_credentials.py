"""Lazy reads of a private image with short-lived credentials from a kubelet credential
provider (root).

A token-auth registry (behind a counting proxy that records every blob read) holds an image
indexed with `sociable convert --user`. Its token server accepts a password only while it is
fresh, and the registry refuses a token as soon as its 2 s have passed. The daemon has no
docker config and no CRI proxy (`[cri] enable = false`): its only credentials come from a
credential-provider plugin (`tests/support/credplugin.py`) whose passwords are valid for a
few seconds and whose answers are kept for `cacheDuration` 3 s. containerd pulls the image
itself with credentials of its own; every layer read after that is the daemon's.

A container then reads files spread over several token and cache lifetimes, with background
fetch on (throttled so it keeps reading from the registry): every file has the right
checksum, the plugin ran again as its answers ran out but no more often than its cache allows,
no credential was refused, and no secret reached the daemon's log. When the token server
revokes the plugin's passwords before the daemon's cached answer runs out, the refusal makes
the daemon run the plugin again at once and reads go on without an error.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from snapshotter.api import cri_images_pb2 as cri
from snapshotter.api import cri_images_pb2_grpc
from tests.integration.test_private_lazy import layer_sums, parse_sums, sha256sum
from tests.support import images
from tests.support.cli import sociable
from tests.support.containerd import (
    Containerd,
    ContainerdPaths,
    PushedImages,
    require_containerd,
    start_containerd,
)
from tests.support.credplugin import UNTIL, password_fresh
from tests.support.registry import (
    TOKEN_SERVICE,
    CountingProxy,
    RegistryServer,
    TokenServer,
    registry_available,
    start_proxy,
    start_registry,
)
from tests.support.snapclient import SnapDaemon, run_daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

PLUGIN = Path(__file__).resolve().parents[1] / "support" / "credplugin.py"
K8S = "k8s.io"
TIMEOUT_S = 300.0
MIN_LAYER_SIZE = 100_000
REPOSITORY = "private/provided"
PROVIDER = "test-provider"
CACHE_DURATION_S = 3.0
"""The plugin's `cacheDuration`: the daemon runs it again once its answer is about to expire."""
PLUGIN_USER = "user"
"""The user name credplugin.py answers with."""
PASSWORD_TTL_S = 5.0
"""How long the token server accepts a password the plugin made."""
TOKEN_LIFETIME_S = 2
"""`expires_in` of the registry tokens; the registry refuses them right after."""
FILES = (
    "os.py",
    "json/decoder.py",
    "email/message.py",
    "typing.py",
    "argparse.py",
    "_pydecimal.py",
)
"""Read one by one (paths under /usr/lib/python3.11), PAUSE_S apart."""
REVOKED_FILES = ("pathlib.py", "inspect.py", "dataclasses.py", "tarfile.py")
"""Read after the plugin's passwords so far were revoked."""
PAUSE_S = 2.5
SPAN_S = PAUSE_S * (len(FILES) - 1)


@dataclass
class BlobLog:
    """When the counting proxy saw each blob request (Range header or "" for a full GET)."""

    reads: list[tuple[float, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, path: str, range_header: str) -> float:
        if "/blobs/sha256:" in path:
            with self.lock:
                self.reads.append((time.monotonic(), path.rsplit("/", 1)[-1], range_header))
        return 0.0

    def of(self, digest: str) -> list[tuple[float, str]]:
        with self.lock:
            return [(t, r) for t, d, r in self.reads if d == digest]


@dataclass
class Stack:
    registry: RegistryServer
    token_server: TokenServer
    proxy: CountingProxy
    blobs: BlobLog
    daemon: SnapDaemon
    containerd: Containerd
    image: images.Image
    ref: str
    runs_file: Path
    """One line per plugin run: the wall-clock time it started."""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.daemon.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def count(self, msg: str) -> int:
        return sum(1 for e in self.events() if e.get("msg") == msg)

    def plugin_runs(self) -> list[float]:
        if not self.runs_file.exists():
            return []
        return [float(x) for x in self.runs_file.read_text().split()]


def fresh_password(ttl_s: float) -> str:
    """A password the token server accepts for `ttl_s` seconds (the plugin's form)."""
    return f"token-0{UNTIL}{int(time.time() + ttl_s)}"


def write_provider(base: Path, registry_host: str) -> tuple[Path, Path, Path]:
    """The provider config and bin dir (a wrapper that stamps each run, then runs
    credplugin.py); returns (config, bin_dir, runs_file)."""
    bin_dir = base / "provider-bin"
    bin_dir.mkdir()
    runs = base / "plugin-runs"
    count = base / "plugin-count"
    wrapper = bin_dir / PROVIDER
    wrapper.write_text(
        "#!/bin/sh\n"
        f"date +%s.%N >> {runs}\n"
        f"exec {sys.executable} {PLUGIN} --count-file {count} --cache-duration {CACHE_DURATION_S:g}s "
        f'--password-ttl {PASSWORD_TTL_S:g} "$@"\n'
    )
    wrapper.chmod(0o755)
    config = base / "credential-providers.yaml"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "kubelet.config.k8s.io/v1",
                "kind": "CredentialProviderConfig",
                "providers": [
                    {
                        "name": PROVIDER,
                        "matchImages": [registry_host],
                        "defaultCacheDuration": "1h",
                        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                    }
                ],
            }
        )
    )
    return config, bin_dir, runs


@pytest.fixture(scope="module")
def stack(pushed_images: PushedImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_containerd()
    if not registry_available():
        pytest.skip("PREREQUISITE MISSING: docker-registry is not installed")
    base = tmp_path_factory.mktemp("provider-credentials")
    image = images.bulk_image()
    token_server = TokenServer()
    with start_registry(base / "registry", "token", token_server=token_server) as registry:
        pushed = f"{registry.host}/{REPOSITORY}:v1-soci"
        sociable(
            "convert",
            "--user",
            registry.user,
            "--min-layer-size",
            str(MIN_LAYER_SIZE),
            f"oci-layout:{image.layout}:{image.tag}",
            pushed,
            root=base / "convert-root",
        )
        # From now on only fresh plugin-made passwords, and tokens that expire in 2 s.
        token_server.username = PLUGIN_USER
        token_server.password_check = password_fresh
        token_server.expires_in_sec = TOKEN_LIFETIME_S
        token_server.strict_expiry = True
        blobs = BlobLog()
        ctd_paths = ContainerdPaths(base / "containerd")
        with start_proxy(registry, hold=blobs) as proxy:
            provider_config, bin_dir, runs = write_provider(base, proxy.host)
            config = base / "sociable.toml"
            config.write_text(
                "[remote]\n"
                'hosts_dir = ""\n'
                f'docker_config = "{base / "no-docker" / "config.json"}"\n'
                "background_fetch = true\n"
                "background_quiet_period_ms = 500\n"
                "background_rate_bytes_per_sec = 1048576\n"
                "background_step_bytes = 262144\n"
                "[cri]\n"
                "enable = false\n"
                "[credential_providers]\n"
                f'config = "{provider_config}"\n'
                f'bin_dir = "{bin_dir}"\n'
            )
            with (
                run_daemon(base / "sociable", config=config) as daemon,
                start_containerd(
                    ctd_paths.base,
                    proxy_address=daemon.address,
                    registry_hosts=[proxy.host, registry.host, pushed_images.host],
                    sandbox_image=pushed_images.pause_ref,
                ) as ctd,
            ):
                yield Stack(
                    registry=registry,
                    token_server=token_server,
                    proxy=proxy,
                    blobs=blobs,
                    daemon=daemon,
                    containerd=ctd,
                    image=image,
                    ref=pushed.replace(registry.host, proxy.host),
                    runs_file=runs,
                )


def test_pull_is_lazy_with_the_providers_credentials(stack: Stack) -> None:
    """containerd pulls with credentials of its own (through its CRI, not the daemon's);
    the daemon's index discovery asks the plugin."""
    images_api = cri_images_pb2_grpc.ImageServiceStub(stack.containerd.channel())
    auth = cri.AuthConfig(username=stack.token_server.username, password=fresh_password(600))
    request = cri.PullImageRequest(image=cri.ImageSpec(image=stack.ref), auth=auth)
    pulled = images_api.PullImage(request, timeout=TIMEOUT_S)
    assert pulled.image_ref == stack.image.config_digest
    assert stack.count("lazy layer mounted") == 3, stack.daemon.log_tail(60)
    assert len(stack.plugin_runs()) >= 1, stack.daemon.log_tail(60)
    assert stack.count("credential provider failed") == 0


def test_lazy_reads_across_token_lifetimes(stack: Stack) -> None:
    bulk = stack.image.layers[-1]
    script = "; ".join(
        f"{sha256sum((name,))}" + ("" if i == len(FILES) - 1 else f"; sleep {PAUSE_S:g}")
        for i, name in enumerate(FILES)
    )
    runs_before = len(stack.plugin_runs())
    start_wall, start = time.time(), time.monotonic()
    output = stack.containerd.run(
        stack.ref, "provided-1", "/bin/sh", "-c", script, namespace=K8S, timeout=TIMEOUT_S
    )
    end_wall, end = time.time(), time.monotonic()
    elapsed = end - start

    sums = parse_sums(output)
    for path, digest in layer_sums(stack.image, FILES).items():
        assert sums.get(path) == digest, f"{path}: {sums.get(path)} != {digest}\n{output}"
    assert elapsed >= SPAN_S >= 3 * CACHE_DURATION_S > 3 * TOKEN_LIFETIME_S

    # The registry served blob reads of the bulk layer all along: early, and more than three
    # token lifetimes (and cache durations) later.
    reads = [t - start for t, r in stack.blobs.of(bulk.digest) if t >= start]
    assert reads and all(r for t, r in stack.blobs.of(bulk.digest) if t >= start)
    assert min(reads) < TOKEN_LIFETIME_S, reads[:5]
    assert max(reads) > 3 * CACHE_DURATION_S, reads[-5:]
    # Nothing refused: no stale password reached the token server, no expired token the
    # registry, no plugin failed.
    assert stack.token_server.refused == 0
    assert stack.count("credential provider failed") == 0
    unauthorized = [
        e for e in stack.events() if re.search(r"\b401\b", f"{e.get('msg')} {e.get('error')}")
    ]
    assert unauthorized == [], unauthorized[:3]

    # The plugin ran again as its answers ran out, but no more often than its cache allows:
    # a new run only when less than a tenth of the 3 s is left.
    runs = stack.plugin_runs()
    during = [t for t in runs if start_wall <= t <= end_wall]
    assert len(runs) > runs_before and len(during) >= 2, (runs, start_wall, end_wall)
    span = runs[-1] - runs[0]
    bound = math.floor(span / (0.9 * CACHE_DURATION_S)) + 2
    assert len(runs) <= bound, (len(runs), span)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert min(gaps) >= 0.8 * CACHE_DURATION_S, gaps
    print(
        f"\n{len(FILES)} files read over {elapsed:.1f} s; plugin runs {len(runs)} "
        f"({len(during)} during the reads) over {span:.1f} s, gaps "
        f"{[round(g, 2) for g in gaps]}; token requests {dict(stack.token_server.requests)}; "
        f"{len(reads)} blob reads of the bulk layer during the reads, the last at "
        f"{max(reads):.1f} s; {sum(stack.proxy.bytes_sent.values())} bytes served in all"
    )


def test_registry_refuses_stale_credentials(stack: Stack) -> None:
    """The control: the registry side does reject what the daemon never sent. A password
    past its time gets no token; a token is refused as soon as its 2 s have passed."""
    server = stack.token_server
    user = server.username
    params = {"service": TOKEN_SERVICE, "scope": f"repository:{REPOSITORY}:pull"}
    stale = f"token-9{UNTIL}{int(time.time()) - 1}"
    refused_before = server.refused
    answer = httpx.get(server.realm, params=params, auth=(user, stale))
    assert answer.status_code == 401 and server.refused == refused_before + 1
    answer = httpx.get(server.realm, params=params, auth=(user, fresh_password(60)))
    assert answer.status_code == 200
    token = answer.json()["token"]
    url = f"{stack.registry.url}/v2/{REPOSITORY}/tags/list"
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(url, headers=headers).status_code == 200
    time.sleep(TOKEN_LIFETIME_S + 1.2)
    assert httpx.get(url, headers=headers).status_code == 401


def test_a_revoked_password_makes_the_plugin_run_again(stack: Stack) -> None:
    """Right after a plugin run, the token server stops accepting every password the plugin
    made so far, long before the daemon's cached answer runs out: the refusal makes the
    daemon ask the plugin again at once and retry, so reads go on without a warning."""
    seen = len(stack.plugin_runs())
    deadline = time.monotonic() + 5 * CACHE_DURATION_S
    while len(stack.plugin_runs()) == seen:  # background fetch keeps asking
        assert time.monotonic() < deadline, "no plugin run while background fetch goes on"
        time.sleep(0.02)
    time.sleep(0.3)  # its answer is in the daemon's cache and made a registry token
    runs = stack.plugin_runs()
    revoked, last_revoked = len(runs), runs[-1]

    def not_revoked(password: str) -> bool:
        run = password.removeprefix("token-").partition("-")[0]
        return password_fresh(password) and run.isdigit() and int(run) > revoked

    refused_before = stack.token_server.refused
    events_before = len(stack.events())
    stack.token_server.password_check = not_revoked
    time.sleep(TOKEN_LIFETIME_S / 2 + 0.2)  # the daemon's cached registry tokens are gone
    output = stack.containerd.run(
        stack.ref, "provided-2", "/bin/sh", "-c", sha256sum(REVOKED_FILES), namespace=K8S
    )
    sums = parse_sums(output)
    for path, digest in layer_sums(stack.image, REVOKED_FILES).items():
        assert sums.get(path) == digest, f"{path}: {sums.get(path)} != {digest}\n{output}"
    assert stack.token_server.refused > refused_before  # a revoked password was presented
    later = [t - last_revoked for t in stack.plugin_runs()[revoked:]]
    assert later and later[0] < 0.9 * CACHE_DURATION_S, later  # sooner than the cache says
    trouble = [e for e in stack.events()[events_before:] if e.get("level") in ("warning", "error")]
    assert trouble == [], trouble[:3]
    print(
        f"\nrevoked: {stack.token_server.refused - refused_before} token requests refused; "
        f"the plugin ran again {later[0]:.2f} s after the revoked run"
    )


def test_no_secret_in_the_log(stack: Stack) -> None:
    log = stack.daemon.log.read_text(errors="replace")
    assert "lazy layer mounted" in log
    assert len(stack.plugin_runs()) >= 2
    basic = base64.b64encode(f"{stack.token_server.username}:token-".encode()).decode()
    for secret in (UNTIL, "eyJ", basic[:-4]):  # plugin passwords, JWTs, Basic headers
        assert secret not in log, secret
