"""`ImageStore`: which manifest an image name points at, in containerd's image store.

containerd keeps images by name in each namespace: a name (for images CRI pulls, in `k8s.io`,
the normalised reference as pulled, `docker.io/library/busybox:1.36`,
`10.0.0.5:5000/team/app:v1`) mapped to the root of its content, a descriptor of a manifest or
an index. The registry mirror resolves a tag with it (`image_name` builds the name from a
mirror request), through containerd's `containerd.services.images.v1.Images` `Get` call.

grpcio is synchronous: every call waits in a worker thread behind a limiter (`IMAGE_THREADS`
unless the caller passes its own), never on the trio thread; a trio task cancelled while its
thread waits cancels the gRPC call, which ends the wait at once. Each call has the deadline
`timeout_sec` (seconds).

Errors: gRPC status codes are translated once, here:

    NOT_FOUND                       target() → None
    UNAVAILABLE (containerd down),
    DEADLINE_EXCEEDED, any other    ImageStoreError naming the image and the code
    an answer that does not fit     ImageStoreError (code None)
"""

from __future__ import annotations

import re
from typing import Final

import grpc
import trio

from index.digest import Digest, DigestError
from index.oci.reference import Reference
from snapshotter.api import images_pb2, images_pb2_grpc

from .content import NAMESPACE_HEADER, one_line

IMAGE_THREADS: Final = trio.CapacityLimiter(2)
"""Worker threads waiting on containerd's Images API (every `ImageStore` by default)."""

DEFAULT_TIMEOUT_SEC: Final = 10.0
"""Deadline of one `target` call, in seconds."""

_TAG: Final = re.compile(r"^[\w][\w.-]{0,127}$")
"""A tag as the distribution spec allows it (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`)."""


class ImageStoreError(Exception):
    """containerd's image store could not answer: it is down or too slow, refused the
    request, or sent an answer that does not fit it. The message is one line naming the
    image; `code` is the gRPC status code (None when containerd's answer itself was wrong)."""

    def __init__(self, message: str, *, name: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.name = name
        self.code = code


def is_tag(text: str) -> bool:
    """Whether `text` is a valid tag (what a manifests request names when not a digest)."""
    return _TAG.match(text) is not None


def image_name(registry: str, repository: str, tag: str) -> str:
    """The name containerd's CRI stores the image `registry/repository:tag` under: the
    reference normalised as CRI normalises what it pulls (`index.docker.io` is `docker.io`, a
    one-component Docker Hub repository is under `library/`). Raises ValueError for a tag
    that is not one."""
    if not is_tag(tag):
        raise ValueError(f"not a tag: {tag!r}")
    return str(Reference.parse(f"{registry}/{repository}:{tag}"))


class ImageStore:
    """Looks images up by name in containerd's image store at unix socket `address`, in
    `namespace`. Use from the trio thread; calls may run concurrently (each waits in its own
    worker thread, at most `limiter`'s size at once). Close with `close`."""

    def __init__(
        self,
        address: str,
        namespace: str = "k8s.io",
        *,
        limiter: trio.CapacityLimiter | None = None,
        timeout_sec: float = DEFAULT_TIMEOUT_SEC,
    ) -> None:
        if timeout_sec <= 0:
            raise ValueError(f"timeout_sec must be > 0, not {timeout_sec}")
        self._target = address if address.startswith("unix:") else f"unix://{address}"
        self._where = address.removeprefix("unix://").removeprefix("unix:")
        self._namespace = namespace
        self._limiter = limiter or IMAGE_THREADS
        self._timeout = timeout_sec
        self._metadata = ((NAMESPACE_HEADER, namespace),)
        self._channel = grpc.insecure_channel(self._target)
        self._stub = images_pb2_grpc.ImagesStub(self._channel)
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<ImageStore {self._where} namespace={self._namespace}{state}>"

    def close(self) -> None:
        """Closes the channel; calls in flight end with ImageStoreError (CANCELLED), later
        calls raise ImageStoreError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def _error(self, name: str, what: str, code: grpc.StatusCode | None) -> ImageStoreError:
        return ImageStoreError(
            f"image {name} from containerd at {self._where}: {what}", name=name, code=code
        )

    async def target(self, name: str) -> tuple[Digest, str, int] | None:
        """The (digest, media type, size in bytes) of the manifest or index the image `name`
        points at, None when containerd has no image of that name in the namespace. Raises
        ImageStoreError."""
        if self._closed:
            raise self._error(name, "the image store client is closed", None)
        future = self._stub.Get.future(
            images_pb2.GetImageRequest(name=name),
            timeout=self._timeout,
            metadata=self._metadata,
        )
        try:
            answer = await trio.to_thread.run_sync(
                future.result, limiter=self._limiter, abandon_on_cancel=True
            )
        except grpc.RpcError as e:
            code_of = getattr(e, "code", None)
            code = code_of() if callable(code_of) else None
            if code is grpc.StatusCode.NOT_FOUND:
                return None
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.UNKNOWN
            details_of = getattr(e, "details", None)
            details = one_line(str((details_of() if callable(details_of) else None) or ""))
            raise self._error(name, f"{code.name}: {details or 'no details'}", code) from e
        finally:
            future.cancel()  # ends the thread's wait when this task was cancelled
        if not answer.HasField("image") or not answer.image.HasField("target"):
            raise self._error(name, "an answer without a target", None)
        target = answer.image.target
        try:
            digest = Digest(target.digest)
        except DigestError as e:
            raise self._error(name, f"target: {e}", None) from e
        if target.size < 0:
            raise self._error(name, f"target size {target.size}", None)
        return digest, target.media_type, int(target.size)
