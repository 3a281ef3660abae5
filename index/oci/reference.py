"""Image references (`[registry/]repository[:tag][@digest]`), parsed and normalised like docker.

Normalisation follows containerd/docker (`ParseNormalizedNamed`): a first path component that
has no `.` or `:` and is not `localhost` is not a registry, so the registry defaults to
`docker.io`; `index.docker.io` becomes `docker.io`; a one-component Docker Hub name gets the
`library/` prefix. No tag is added: `with_default_tag()` does that explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from index.digest import Digest, DigestError
from index.oci.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
"""The registry name used for Docker Hub references."""

DOCKER_HUB_LEGACY = "index.docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
"""The host that actually serves Docker Hub's distribution API."""

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


def _looks_like_registry(component: str) -> bool:
    return (
        any(c in component for c in ".:")
        or component == "localhost"
        or component.lower() != component
    )


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalised image reference.

    `registry` is a host with optional port (`docker.io`, `localhost:5000`, `[::1]:5000`);
    `repository` the path inside it (`library/busybox`); `tag` and `digest` are optional and may
    both be present, in which case the digest is authoritative.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalise `text`.

        Raises InvalidReferenceError naming the input and what is wrong with it.
        """
        if not text or text != text.strip():
            raise InvalidReferenceError(f"invalid reference {text!r}: empty or has whitespace")
        rest = text
        digest: Digest | None = None
        if "@" in rest:
            rest, _, raw_digest = rest.partition("@")
            try:
                digest = Digest(raw_digest)
            except DigestError as e:
                raise InvalidReferenceError(f"invalid reference {text!r}: {e}") from e
        tag: str | None = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG_RE.match(tag):
                raise InvalidReferenceError(f"invalid reference {text!r}: bad tag {tag!r}")
        first, sep, remainder = rest.partition("/")
        if sep and _looks_like_registry(first):
            registry, repository = first, remainder
        else:
            registry, repository = DOCKER_HUB, rest
        if not _DOMAIN_RE.match(registry):
            raise InvalidReferenceError(f"invalid reference {text!r}: bad registry {registry!r}")
        if registry == DOCKER_HUB_LEGACY:
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = "library/" + repository
        if not _REPOSITORY_RE.match(repository):
            raise InvalidReferenceError(
                f"invalid reference {text!r}: repository {repository!r} must be lowercase "
                "components of [a-z0-9] joined by '/', '.', '_', '__' or '-'"
            )
        if len(registry) + 1 + len(repository) > MAX_NAME_LENGTH:
            raise InvalidReferenceError(
                f"invalid reference {text!r}: name longer than {MAX_NAME_LENGTH} characters"
            )
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the manifests endpoint for: the digest if any, else the tag.

        Raises InvalidReferenceError when there is neither (use `with_default_tag()` first).
        """
        if self.digest is not None:
            return str(self.digest)
        if self.tag is not None:
            return self.tag
        raise InvalidReferenceError(f"reference {self} has neither tag nor digest")

    def with_default_tag(self) -> Reference:
        """This reference, with tag `latest` when it has neither tag nor digest."""
        if self.tag is None and self.digest is None:
            return replace(self, tag=DEFAULT_TAG)
        return self

    def with_tag(self, tag: str) -> Reference:
        """The same repository at `tag` (no digest). Raises InvalidReferenceError on a bad tag."""
        if not _TAG_RE.match(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r} for {self.name}")
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: Digest) -> Reference:
        """The same repository pinned to `digest` (no tag)."""
        return Reference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out


def parse_reference(text: str) -> Reference:
    """`Reference.parse(text)`; raises InvalidReferenceError."""
    return Reference.parse(text)
