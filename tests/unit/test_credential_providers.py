"""kubelet credential-provider plugins: the config file, kubelet's glob rules, and real plugin
runs (tests/support/credplugin.py behind a shell wrapper) for caching, refresh, shared runs and
failures."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import trio

from index.oci.errors import CredentialsError
from snapshotter.config import CredentialProvidersConfig
from snapshotter.credentials import (
    PluginSpec,
    ProviderConfig,
    ProviderKeychain,
    load_keychain,
    load_provider_config,
    match_image,
    parse_go_duration,
    parse_provider_config,
    repository_of,
)

PLUGIN = Path(__file__).resolve().parents[1] / "support" / "credplugin.py"
V1 = "credentialprovider.kubelet.k8s.io/v1"

# --------------------------------------------------------------------------------------------
# The config file

YAML_CONFIG = """\
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: nodes
  - name: acr
    matchImages: ["*.azurecr.io"]
    defaultCacheDuration: 10m30s
    apiVersion: credentialprovider.kubelet.k8s.io/v1beta1
"""


def test_config_yaml() -> None:
    config = parse_provider_config(YAML_CONFIG, "/etc/k/cp.yaml")
    assert [p.name for p in config.providers] == ["ecr-credential-provider", "acr"]
    ecr, acr = config.providers
    assert ecr.match_images == ("*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn")
    assert ecr.default_cache_duration_sec == 12 * 3600
    assert ecr.api_version == V1
    assert ecr.args == ("get-credentials",)
    assert ecr.env == (("AWS_PROFILE", "nodes"),)
    assert acr.default_cache_duration_sec == 630
    assert acr.args == () and acr.env == ()
    assert "nodes" not in repr(ecr)  # env values stay out of reprs


def test_config_json_and_older_api_versions(tmp_path: Path) -> None:
    doc = {
        "apiVersion": "kubelet.config.k8s.io/v1alpha1",
        "kind": "CredentialProviderConfig",
        "providers": [
            {
                "name": "gcp",
                "matchImages": ["gcr.io", "*.pkg.dev"],
                "defaultCacheDuration": "0s",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1",
            }
        ],
    }
    path = tmp_path / "cp.json"
    path.write_text(json.dumps(doc))
    config = load_provider_config(path)
    assert config.source == str(path)
    (gcp,) = config.providers
    assert gcp.match_images == ("gcr.io", "*.pkg.dev")
    assert gcp.default_cache_duration_sec == 0
    assert gcp.api_version == "credentialprovider.kubelet.k8s.io/v1alpha1"


def _provider(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "p",
        "matchImages": ["r.io"],
        "defaultCacheDuration": "1h",
        "apiVersion": V1,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def _config(*providers: dict[str, object], **top: object) -> str:
    doc: dict[str, object] = {
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": list(providers),
    }
    doc.update(top)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("providers: [a, b", "line "),
        ("- just a list", "document"),
        (_config(_provider(), apiVersion="kubelet.config.k8s.io/v2"), "apiVersion"),
        (_config(_provider(), kind="Other"), "kind"),
        (_config(), "providers"),
        (_config(_provider(name=None)), "providers[0].name"),
        (_config(_provider(name="../x")), "providers[0].name"),
        (_config(_provider(matchImages=[])), "providers[0].matchImages"),
        (_config(_provider(matchImages="r.io")), "providers[0].matchImages"),
        (_config(_provider(matchImages=["r.io", "[z-a].io"])), "providers[0].matchImages[1]"),
        (_config(_provider(defaultCacheDuration=None)), "providers[0].defaultCacheDuration"),
        (_config(_provider(defaultCacheDuration="12 hours")), "providers[0].defaultCacheDuration"),
        (_config(_provider(defaultCacheDuration="-1h")), "providers[0].defaultCacheDuration"),
        (_config(_provider(apiVersion="v1")), "providers[0].apiVersion"),
        (_config(_provider(args=[1])), "providers[0].args"),
        (_config(_provider(env=[{"value": "x"}])), "providers[0].env[0].name"),
        (_config(_provider(env={"A": "b"})), "providers[0].env"),
        (_config(_provider(), _provider(name="q", extra=1)), "providers[1].extra"),
        (_config(_provider(tokenAttributes={})), "providers[0].tokenAttributes"),
        (_config(_provider(), _provider()), "providers[1].name"),
    ],
)
def test_config_errors_name_file_and_field(text: str, field: str) -> None:
    with pytest.raises(CredentialsError) as info:
        parse_provider_config(text, "/etc/k/cp.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("credential provider config /etc/k/cp.yaml: ")
    assert field in message


def test_config_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=r"cannot read .*missing\.yaml"):
        load_provider_config(tmp_path / "missing.yaml")


def test_load_keychain_from_config_table(tmp_path: Path) -> None:
    assert load_keychain(CredentialProvidersConfig()) is None
    path = tmp_path / "cp.yaml"
    path.write_text(YAML_CONFIG)
    with pytest.raises(CredentialsError, match="bin_dir"):
        load_keychain(CredentialProvidersConfig(config=str(path)))
    keychain = load_keychain(CredentialProvidersConfig(config=str(path), bin_dir=str(tmp_path)))
    assert keychain is not None
    assert keychain.bin_dir == tmp_path
    assert "ecr-credential-provider" in repr(keychain)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12h0m0s", 43200.0),
        ("5h59m30s", 21570.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("2s", 2.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1m30.5s", 90.5),
        ("10us", 1e-5),
        ("-1m", -60.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "1d", "h", "1h 2m", "s1"])
def test_go_durations_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


# --------------------------------------------------------------------------------------------
# Matching: the examples of kubelet's CredentialProvider.matchImages documentation and its
# URLsMatch tests.


@pytest.mark.parametrize(
    ("glob", "image", "matches"),
    [
        (
            "123456789.dkr.ecr.us-east-1.amazonaws.com",
            "123456789.dkr.ecr.us-east-1.amazonaws.com/app",
            True,
        ),
        ("*.dkr.ecr.*.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/app", True),
        ("*.dkr.ecr.*.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com.cn/app", False),
        ("*.azurecr.io", "myregistry.azurecr.io/team/app", True),
        ("*.azurecr.io", "azurecr.io/app", False),
        ("gcr.io", "gcr.io/project/app", True),
        ("gcr.io", "us.gcr.io/project/app", False),
        ("*.*.registry.io", "a.b.registry.io/app", True),
        ("*.*.registry.io", "b.registry.io/app", False),
        # one `*` is one host part: *.io does not match *.k8s.io
        ("*.io", "registry.k8s.io/pause", False),
        ("*.k8s.io", "registry.k8s.io/pause", True),
        ("k8s.*.io", "k8s.registry.io/pause", True),
        ("k8s.*", "k8s.io/pause", True),
        ("app*.k8s.io", "app1.k8s.io/x", True),
        ("app*.k8s.io", "web.k8s.io/x", False),
        # ports must be equal (both absent or the same)
        ("registry.io:8080/path", "registry.io:8080/path/app", True),
        ("registry.io:8080/path", "registry.io/path/app", False),
        ("registry.io:8080/path", "registry.io:9090/path/app", False),
        ("registry.io", "registry.io:5000/app", False),
        ("localhost:5000", "localhost:5000/app", True),
        # the glob's path is a string prefix of the image's path
        ("registry.io/team", "registry.io/team/app", True),
        ("registry.io/team", "registry.io/teams/app", True),
        ("registry.io/team/", "registry.io/teams/app", False),
        ("registry.io/team", "registry.io/other/app", False),
        # schemes are ignored
        ("https://gcr.io", "gcr.io/project/app", True),
        ("gcr.io", "https://gcr.io/project/app", True),
        ("http://*.azurecr.io", "x.azurecr.io/app", True),
        # Go filepath.Match syntax inside a part
        # `?` starts a URL query (kubelet reads globs as URLs): it is no wildcard
        ("reg?.io", "reg1.io/app", False),
        ("reg[0-9].io", "reg7.io/app", True),
        ("reg[^0-9].io", "reg7.io/app", False),
        ("reg[0-9.io", "reg7.io/app", False),  # malformed: matches nothing
    ],
)
def test_match_images_as_kubelet(glob: str, image: str, matches: bool) -> None:
    assert match_image(glob, image) is matches


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("r.io/a/b:1.0", "r.io/a/b"),
        ("r.io:5000/a/b:1.0", "r.io:5000/a/b"),
        ("r.io:5000/a/b", "r.io:5000/a/b"),
        ("r.io/a/b@sha256:" + "0" * 64, "r.io/a/b"),
        ("r.io/a/b:1@sha256:" + "0" * 64, "r.io/a/b"),
    ],
)
def test_repository_of(image: str, repo: str) -> None:
    assert repository_of(image) == repo


# --------------------------------------------------------------------------------------------
# Real plugin runs


class Plugin:
    """A plugin binary `<tmp>/bin/<name>` (shell wrapper around credplugin.py) and its files."""

    def __init__(self, tmp_path: Path, name: str = "testplugin") -> None:
        self.bin_dir = tmp_path / "bin"
        self.bin_dir.mkdir(exist_ok=True)
        self.name = name
        self.count_file = tmp_path / f"{name}.count"
        self.mode_file = tmp_path / f"{name}.mode"
        wrapper = self.bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {PLUGIN} "$@"\n')
        wrapper.chmod(0o755)

    @property
    def runs(self) -> list[str]:
        if not self.count_file.exists():
            return []
        return self.count_file.read_text().splitlines()

    def set_mode(self, mode: str) -> None:
        self.mode_file.write_text(mode)

    def spec(
        self,
        *args: str,
        match: tuple[str, ...] = ("*.example.test", "*.example.test:5000"),
        default: float = 3600.0,
    ) -> PluginSpec:
        return PluginSpec(
            name=self.name,
            match_images=match,
            default_cache_duration_sec=default,
            api_version=V1,
            args=(
                "--count-file",
                str(self.count_file),
                "--mode-file",
                str(self.mode_file),
                *args,
            ),
        )

    def keychain(
        self, *args: str, timeout_sec: float = 60.0, default: float = 3600.0
    ) -> ProviderKeychain:
        spec = self.spec(*args, default=default)
        return ProviderKeychain(
            ProviderConfig("test", (spec,)), self.bin_dir, timeout_sec=timeout_sec
        )


async def test_plugin_answer_and_request(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--cache-key-type", "Image")
    creds = await keychain.credentials("reg.example.test/team/app:1.0")
    assert creds is not None
    assert (creds.username, creds.secret) == ("user", "token-1")
    # the plugin is asked for the repository, without its tag
    assert plugin.runs == ["reg.example.test/team/app"]
    # an image no plugin matches runs nothing
    assert await keychain.credentials("docker.io/library/busybox:1") is None
    assert plugin.runs == ["reg.example.test/team/app"]


async def test_plugin_env_and_args(tmp_path: Path) -> None:
    # env is passed to the plugin: a wrapper that records one variable
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen"
    wrapper = bin_dir / "envplugin"
    wrapper.write_text(
        f'#!/bin/sh\necho "$MY_VAR $1 $SOCIABLE_UNSET_MARKER" > {seen}\n'
        f"exec {sys.executable} {PLUGIN} --count-file {tmp_path / 'count'}\n"
    )
    wrapper.chmod(0o755)
    spec = PluginSpec("envplugin", ("*.example.test",), 60.0, V1, ("first",), (("MY_VAR", "v1"),))
    keychain = ProviderKeychain(ProviderConfig("t", (spec,)), bin_dir)
    os.environ["SOCIABLE_UNSET_MARKER"] = "leaked"
    try:
        creds = await keychain.credentials("reg.example.test/app")
    finally:
        del os.environ["SOCIABLE_UNSET_MARKER"]
    assert creds is not None and creds.secret == "token-1"
    # configured env added; the daemon's other variables are not passed on
    assert seen.read_text().split() == ["v1", "first"]


@pytest.mark.parametrize(
    ("key_type", "second_image", "runs_after_second", "third_image", "runs_after_third"),
    [
        # Image: another repository of the same registry runs the plugin again
        ("Image", "reg.example.test/team/app:2.0", 1, "reg.example.test/team/other", 2),
        # Registry: every repository of the registry shares one answer; another registry runs
        ("Registry", "reg.example.test/team/other", 1, "other.example.test/app", 2),
        # Global: one answer for every image the plugin serves
        ("Global", "reg.example.test/team/other", 1, "other.example.test/app", 1),
    ],
)
async def test_cache_per_key_type(
    tmp_path: Path,
    key_type: str,
    second_image: str,
    runs_after_second: int,
    third_image: str,
    runs_after_third: int,
) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain(
        "--cache-key-type",
        key_type,
        "--auth-key",
        "*.example.test",
        "--cache-duration",
        "1h",
    )
    first = await keychain.credentials("reg.example.test/team/app:1.0")
    assert first is not None and first.secret == "token-1"
    second = await keychain.credentials(second_image)
    assert len(plugin.runs) == runs_after_second
    assert second is not None and second.secret == "token-1"
    third = await keychain.credentials(third_image)
    assert len(plugin.runs) == runs_after_third
    assert third is not None and third.secret == f"token-{runs_after_third}"


async def test_most_specific_auth_key_wins(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain(
        "--cache-key-type",
        "Global",
        "--auth-key",
        "*.example.test=wildcard",
        "--auth-key",
        "reg.example.test=host",
        "--auth-key",
        "https://reg.example.test/v2/team=team",
        "--auth-key",
        "reg.example.test:5000=port",
    )

    async def secret(image: str) -> str | None:
        creds = await keychain.credentials(image)
        return None if creds is None else creds.secret

    assert await secret("reg.example.test/team/app") == "team"
    assert await secret("reg.example.test/other/app") == "host"
    assert await secret("web.example.test/app") == "wildcard"
    assert await secret("reg.example.test:5000/app") == "port"
    assert len(plugin.runs) == 1


async def test_docker_hub_key_serves_docker_hub_images(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    spec = plugin.spec(
        "--cache-key-type",
        "Global",
        "--auth-key",
        "https://index.docker.io/v1/=hub",
        match=("docker.io", "index.docker.io", "*.example.test"),
    )
    keychain = ProviderKeychain(ProviderConfig("t", (spec,)), plugin.bin_dir)
    hub = await keychain.credentials("docker.io/library/busybox:1")
    assert hub is not None and hub.secret == "hub"
    index = await keychain.credentials("index.docker.io/library/busybox")
    assert index is not None and index.secret == "hub"
    assert await keychain.credentials("reg.example.test/library/busybox") is None
    assert len(plugin.runs) == 1


async def test_no_matching_auth_key_is_none(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--auth-key", "elsewhere.test")
    assert await keychain.credentials("reg.example.test/app") is None
    assert len(plugin.runs) == 1


async def test_default_and_zero_cache_durations(tmp_path: Path) -> None:
    # no cacheDuration in the answer: the provider's defaultCacheDuration (here 0: no cache)
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain(default=0.0)
    await keychain.credentials("reg.example.test/app")
    await keychain.credentials("reg.example.test/app")
    assert len(plugin.runs) == 2
    # "0s" in the answer overrides a long default: not cached either
    plugin2 = Plugin(tmp_path, "zero")
    keychain2 = plugin2.keychain("--cache-duration", "0s", default=3600.0)
    await keychain2.credentials("reg.example.test/app")
    await keychain2.credentials("reg.example.test/app")
    assert len(plugin2.runs) == 2
    # no cacheDuration, long default: cached
    plugin3 = Plugin(tmp_path, "long")
    keychain3 = plugin3.keychain(default=3600.0)
    await keychain3.credentials("reg.example.test/app")
    await keychain3.credentials("reg.example.test/app")
    assert len(plugin3.runs) == 1


@pytest.mark.slow
async def test_refresh_before_expiry(tmp_path: Path) -> None:
    # a 2 s answer is refreshed when less than 10 % (0.2 s) is left
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--cache-duration", "2s")
    first = await keychain.credentials("reg.example.test/app")
    start = trio.current_time()
    assert first is not None and first.secret == "token-1"
    await trio.sleep(1.0)
    again = await keychain.credentials("reg.example.test/app")
    if trio.current_time() - start < 1.75:
        assert again is not None and again.secret == "token-1"
        assert len(plugin.runs) == 1
    await trio.sleep_until(start + 1.85)
    refreshed = await keychain.credentials("reg.example.test/app")
    assert refreshed is not None and refreshed.secret == "token-2"
    assert len(plugin.runs) == 2


async def test_answers_run_out_and_are_dropped(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--cache-key-type", "Image", "--cache-duration", "300ms")
    await keychain.credentials("reg.example.test/a")
    assert "cached=1" in repr(keychain)
    await trio.sleep(0.35)
    await keychain.credentials("reg.example.test/b")
    # the first answer ran out: dropped when the second was stored
    assert "cached=1" in repr(keychain)
    await trio.sleep(0.35)
    creds = await keychain.credentials("reg.example.test/b")
    assert creds is not None and creds.secret == "token-3"
    assert plugin.runs == ["reg.example.test/a", "reg.example.test/b", "reg.example.test/b"]


@pytest.mark.slow
async def test_failed_refresh_keeps_the_unexpired_answer(tmp_path: Path) -> None:
    # a 4 s answer is refreshed from 3.6 s on: a failing refresh then leaves ~0.4 s of it
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--cache-duration", "4s")
    first = await keychain.credentials("reg.example.test/app")
    start = trio.current_time()
    assert first is not None and first.secret == "token-1"
    plugin.set_mode("fail")
    await trio.sleep_until(start + 3.62)
    kept = await keychain.credentials("reg.example.test/app")
    assert len(plugin.runs) == 2
    assert kept is not None and kept.secret == "token-1"
    # once it has run out, the failure is the caller's
    await trio.sleep_until(start + 4.05)
    with pytest.raises(CredentialsError, match="exited with status 1"):
        await keychain.credentials("reg.example.test/app")
    assert len(plugin.runs) == 3


async def test_concurrent_callers_share_one_run(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--delay", "0.5", "--cache-key-type", "Image")
    results: list[str | None] = []

    async def ask() -> None:
        creds = await keychain.credentials("reg.example.test/app:1.0")
        results.append(None if creds is None else creds.secret)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
    assert results == ["token-1"] * 10
    assert len(plugin.runs) == 1


async def test_concurrent_callers_share_one_uncached_run(tmp_path: Path) -> None:
    # cacheDuration 0s: nothing is kept, but callers arriving during a run still share it
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--delay", "0.5", "--cache-duration", "0s")
    results: list[str | None] = []

    async def ask() -> None:
        creds = await keychain.credentials("reg.example.test/app")
        results.append(None if creds is None else creds.secret)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    assert results == ["token-1"] * 5
    assert len(plugin.runs) == 1


async def test_invalidate_runs_the_plugin_again(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--cache-key-type", "Registry")
    await keychain.credentials("reg.example.test/app")
    await keychain.credentials("reg.example.test/app")
    assert len(plugin.runs) == 1
    keychain.invalidate("reg.example.test/app:1.0")
    creds = await keychain.credentials("reg.example.test/app")
    assert creds is not None and creds.secret == "token-2"
    assert len(plugin.runs) == 2
    keychain.invalidate("docker.io/library/busybox")  # no plugin: nothing to forget
    await keychain.credentials("reg.example.test/app")
    assert len(plugin.runs) == 2


def _assert_one_line_without_secrets(
    error: CredentialsError, caplog: pytest.LogCaptureFixture
) -> None:
    message = str(error)
    assert "\n" not in message
    assert "SECRET" not in message
    assert message.startswith("credential provider testplugin for reg.example.test/app: ")
    for record in caplog.records:
        assert "SECRET" not in record.getMessage()
        assert "SECRET" not in str(record.__dict__)


async def test_failing_plugin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "snapshotter.credentials")
    plugin = Plugin(tmp_path)
    plugin.set_mode("fail")
    keychain = plugin.keychain()
    with pytest.raises(
        CredentialsError, match=r"exited with status 1 \(stderr: \d+ bytes\)"
    ) as info:
        await keychain.credentials("reg.example.test/app:1")
    _assert_one_line_without_secrets(info.value, caplog)
    failures = [r for r in caplog.records if r.getMessage() == "credential provider failed"]
    assert len(failures) == 1
    assert failures[0].__dict__["provider"] == "testplugin"
    assert failures[0].__dict__["stderr_bytes"] == len("plugin failed SECRET-1\n")
    # failures are not cached
    with pytest.raises(CredentialsError):
        await keychain.credentials("reg.example.test/app:1")
    assert len(plugin.runs) == 2


async def test_plugin_printing_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Plugin(tmp_path)
    plugin.set_mode("garbage")
    keychain = plugin.keychain()
    with pytest.raises(CredentialsError, match="malformed JSON") as info:
        await keychain.credentials("reg.example.test/app")
    _assert_one_line_without_secrets(info.value, caplog)


async def test_plugin_answering_another_api_version(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    plugin.set_mode("wrong-version")
    keychain = plugin.keychain()
    with pytest.raises(CredentialsError, match="apiVersion"):
        await keychain.credentials("reg.example.test/app")


async def test_plugin_invalid_cache_key_type(tmp_path: Path) -> None:
    plugin = Plugin(tmp_path)
    keychain = plugin.keychain("--cache-key-type", "Pod")
    with pytest.raises(CredentialsError, match="cacheKeyType"):
        await keychain.credentials("reg.example.test/app")


async def test_plugin_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Plugin(tmp_path)
    plugin.set_mode("hang")
    keychain = plugin.keychain(timeout_sec=0.5)
    start = trio.current_time()
    with pytest.raises(CredentialsError, match=r"timed out after 0\.5 s") as info:
        await keychain.credentials("reg.example.test/app")
    # killed at once (the plugin ignores SIGTERM; a polite stop would take 5 s more)
    assert trio.current_time() - start < 3
    _assert_one_line_without_secrets(info.value, caplog)


async def test_missing_plugin_binary(tmp_path: Path) -> None:
    spec = PluginSpec("absent", ("*.example.test",), 60.0, V1)
    keychain = ProviderKeychain(ProviderConfig("t", (spec,)), tmp_path)
    with pytest.raises(CredentialsError, match=r"cannot run .*absent") as info:
        await keychain.credentials("reg.example.test/app")
    assert "\n" not in str(info.value)


async def test_first_matching_provider_runs(tmp_path: Path) -> None:
    first = Plugin(tmp_path, "first")
    second = Plugin(tmp_path, "second")
    config = ProviderConfig(
        "t",
        (
            first.spec(match=("special.example.test",)),
            second.spec(match=("*.example.test",)),
        ),
    )
    keychain = ProviderKeychain(config, first.bin_dir)
    await keychain.credentials("special.example.test/app")
    await keychain.credentials("other.example.test/app")
    assert first.runs == ["special.example.test/app"]
    assert second.runs == ["other.example.test/app"]
    assert keychain.plugin_for("special.example.test/x:1") == config.providers[0]
