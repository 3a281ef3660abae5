"""CapturedCredentials: keys, expiry, persistence (root-only, atomic), redaction."""

from __future__ import annotations

import base64
import json
import logging
import stat
from pathlib import Path

import pytest

from snapshotter.credentials.captured import (
    DEFAULT_TTL_SEC,
    CapturedCredentials,
    InvalidReferenceError,
    credentials_path,
    jwt_expiry,
)

SECRET = "hunter2-very-secret"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def jwt(claims: dict[str, object]) -> str:
    def enc(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'ES256'})}.{enc(claims)}.c2ln"


def test_capture_keys_by_normalised_repository_and_persists_root_only(tmp_path: Path) -> None:
    path = credentials_path(tmp_path / "root")
    clock = Clock()
    store = CapturedCredentials(path, clock=clock)
    cred = store.capture("busybox:1.36", username="u", password=SECRET)
    assert cred is not None
    assert (cred.host, cred.repository) == ("docker.io", "library/busybox")
    assert cred.captured_at == clock.now
    assert cred.expires_at == clock.now + DEFAULT_TTL_SEC
    assert store.get("docker.io", "library/busybox") == cred
    assert store.get("docker.io", "library/alpine") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["entries"][0]["password"] == SECRET
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left

    reopened = CapturedCredentials(path, clock=clock)
    assert reopened.get("docker.io", "library/busybox") == cred
    assert reopened.get("docker.io", "library/busybox").basic() == ("u", SECRET)  # type: ignore[union-attr]


def test_empty_auth_captures_nothing(tmp_path: Path) -> None:
    path = tmp_path / "credentials" / "cri.json"
    store = CapturedCredentials(path)
    assert store.capture("127.0.0.1:5000/a/b:v1", server_address="127.0.0.1:5000") is None
    assert store.entries() == []
    assert not path.exists()


def test_expiry_default_ttl_and_jwt_exp(tmp_path: Path) -> None:
    clock = Clock()
    store = CapturedCredentials(tmp_path / "c.json", clock=clock)
    store.capture(
        "reg.example.com/team/app:v1", auth=base64.b64encode(b"me:" + SECRET.encode()).decode()
    )
    token = jwt({"exp": clock.now + 300, "sub": "me"})
    store.capture("reg.example.com/team/tok@sha256:" + "a" * 64, registry_token=token)
    opaque = store.capture("reg.example.com/team/opaque", identity_token="not-a-jwt")
    assert opaque is not None and opaque.expires_at == clock.now + DEFAULT_TTL_SEC
    assert store.get("reg.example.com", "team/app").basic() == ("me", SECRET)  # type: ignore[union-attr]
    tok = store.get("reg.example.com", "team/tok")
    assert tok is not None and tok.expires_at == clock.now + 300
    # A JWT expiring later than the default lifetime is still capped by it.
    late = store.capture(
        "reg.example.com/team/late", registry_token=jwt({"exp": clock.now + 10**9})
    )
    assert late is not None and late.expires_at == clock.now + DEFAULT_TTL_SEC

    clock.now += 301
    assert store.get("reg.example.com", "team/tok") is None
    assert store.get("reg.example.com", "team/app") is not None
    clock.now += DEFAULT_TTL_SEC
    assert store.get("reg.example.com", "team/app") is None
    assert store.entries() == []
    # Expired entries are not loaded again, and are dropped from the file at the next write.
    assert CapturedCredentials(tmp_path / "c.json", clock=clock).entries() == []
    store.capture("reg.example.com/other/x", password=SECRET)
    names = [e["repository"] for e in json.loads((tmp_path / "c.json").read_text())["entries"]]
    assert names == ["other/x"]


def test_jwt_expiry_reads_only_well_formed_tokens() -> None:
    assert jwt_expiry(jwt({"exp": 12345})) == 12345.0
    assert jwt_expiry(jwt({"sub": "x"})) is None
    assert jwt_expiry(jwt({"exp": "soon"})) is None
    assert jwt_expiry("a.b") is None
    assert jwt_expiry("a.!!!.c") is None


def test_forget_removes_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    store = CapturedCredentials(path)
    store.capture("ghcr.io/o/r:1", registry_token="tok-" + SECRET)
    assert store.forget("ghcr.io", "o/r") is True
    assert store.forget("ghcr.io", "o/r") is False
    assert store.get("ghcr.io", "o/r") is None
    assert CapturedCredentials(path).entries() == []
    assert SECRET not in path.read_text()


def test_newer_capture_replaces_older(tmp_path: Path) -> None:
    clock = Clock()
    store = CapturedCredentials(tmp_path / "c.json", clock=clock)
    store.capture("ghcr.io/o/r:1", username="a", password="old")
    clock.now += 10
    store.capture("ghcr.io/o/r:2", username="a", password="new")
    got = store.get("ghcr.io", "o/r")
    assert got is not None and got.password == "new" and got.captured_at == clock.now


def test_repr_and_logs_never_show_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = CapturedCredentials(tmp_path / "c.json")
    cred = store.capture(
        "ghcr.io/o/r:1",
        username="user-" + SECRET,
        password=SECRET,
        auth=base64.b64encode(SECRET.encode()).decode(),
        identity_token="id-" + SECRET,
        registry_token="reg-" + SECRET,
    )
    assert cred is not None
    shown = repr(cred) + str(cred) + repr(store) + repr([cred])
    assert "ghcr.io/o/r" in shown and "password" in shown
    assert SECRET not in shown
    assert base64.b64encode(SECRET.encode()).decode() not in shown
    assert "credentials captured" in caplog.text
    for record in caplog.records:
        assert SECRET not in repr(record.__dict__)


def test_bad_file_and_bad_reference(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"version": 1, "entries": [{"host": "h", "repository": "r", "password": 5}]}')
    store = CapturedCredentials(path)
    assert store.entries() == []
    assert "captured credentials file ignored" in caplog.text
    path.write_text('{"password": "' + SECRET + '"')  # truncated JSON
    assert CapturedCredentials(path).entries() == []
    assert SECRET not in caplog.text
    with pytest.raises(InvalidReferenceError):
        store.capture("Not A Reference", password=SECRET)
    assert store.entries() == []
