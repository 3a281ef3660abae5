"""Platforms (`os/architecture[/variant]`): parsing, normalising, host detection and matching.

Matching follows containerd's default matcher closely enough for image selection: OS and
architecture must be equal after normalisation (`x86_64` → `amd64`, `aarch64` → `arm64`, ...);
a wanted variant must equal the candidate's, except that an `arm64` candidate without a
variant counts as `v8`, and an `arm` candidate may have a lower variant than wanted
(an `arm/v7` host runs `arm/v6` images).
"""

from __future__ import annotations

import platform as _stdlib_platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from index.oci.errors import PlatformError

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
}


def _normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch = arch.lower()
    variant = variant.lower()
    if arch in _ARCH_ALIASES:
        norm, default_variant = _ARCH_ALIASES[arch]
        arch, variant = norm, variant or default_variant
    if arch == "arm64":
        if variant in ("8", "v8", ""):
            variant = "v8"
    elif arch == "arm":
        if variant == "":
            variant = "v7"
        elif variant in ("5", "6", "7", "8"):
            variant = "v" + variant
    elif arch == "amd64" and variant == "v1":
        variant = ""
    return arch, variant


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform. Field names are Python's; `to_json` writes the OCI names."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse `os/arch[/variant]` (or just `arch`, meaning linux), normalised.

        Raises PlatformError on an empty or over-long specifier.
        """
        parts = text.strip().split("/")
        if not all(parts) or len(parts) > 3:
            raise PlatformError(f"invalid platform {text!r}: want os/arch[/variant]")
        if len(parts) == 1:
            parts = ["linux", parts[0]]
        os_name = parts[0].lower()
        arch, variant = _normalize_arch(parts[1], parts[2] if len(parts) == 3 else "")
        return cls(os_name, arch, variant)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine (normalised)."""
        os_name = "linux" if sys.platform.startswith("linux") else sys.platform
        arch, variant = _normalize_arch(_stdlib_platform.machine() or "amd64", "")
        return cls(os_name, arch, variant)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Platform:
        """Build from an OCI `platform` object. Raises PlatformError if os/architecture lack."""
        try:
            os_name = obj["os"]
            arch = obj["architecture"]
        except (KeyError, TypeError) as e:
            raise PlatformError(f"invalid platform object {obj!r}: missing {e}") from e
        if not isinstance(os_name, str) or not isinstance(arch, str):
            raise PlatformError(f"invalid platform object {obj!r}: os/architecture not strings")
        features = obj.get("os.features") or ()
        return cls(
            os=os_name,
            architecture=arch,
            variant=str(obj.get("variant", "")),
            os_version=str(obj.get("os.version", "")),
            os_features=tuple(str(f) for f in features),
        )

    def to_json(self) -> dict[str, Any]:
        """The OCI object, in Go field order, empty optional fields omitted."""
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    def normalized(self) -> Platform:
        """The same platform with architecture aliases and default variants resolved."""
        arch, variant = _normalize_arch(self.architecture, self.variant)
        return Platform(self.os.lower(), arch, variant, self.os_version, self.os_features)

    def matches(self, candidate: Platform) -> bool:
        """True if an image built for `candidate` runs on (is selected for) this platform."""
        want = self.normalized()
        have = candidate.normalized()
        if want.os != have.os or want.architecture != have.architecture:
            return False
        if want.variant == have.variant or not self.variant:
            return True
        if want.architecture == "arm" and have.variant and want.variant:
            return have.variant <= want.variant
        return False

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return out + f"/{self.variant}" if self.variant else out


def select_platform(want: Platform, candidates: Sequence[Platform]) -> int | None:
    """Index of the best candidate for `want`: an exact match first, else the first match."""
    wanted = want.normalized()
    for i, candidate in enumerate(candidates):
        if candidate.normalized() == wanted:
            return i
    for i, candidate in enumerate(candidates):
        if want.matches(candidate):
            return i
    return None
