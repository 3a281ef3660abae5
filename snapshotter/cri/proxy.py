"""The CRI image-service proxy: kubelet → sociable → containerd, keeping pull credentials.

kubelet is pointed at the proxy with `--image-service-endpoint=unix://<[cri] address>`
(docs/credentials.md). Every ImageService call (`/runtime.v1.ImageService/<Method>`, and the
older `/runtime.v1alpha2.ImageService/<Method>` containerd 1.6 still serves) is forwarded
unchanged, as raw bytes, to containerd's CRI socket (`[cri] containerd_address`) with the
caller's remaining deadline and metadata; containerd's answer, or its status code and details,
goes back as containerd gave it. Cancelling the call at the proxy cancels it at containerd.

Only `PullImage` is decoded (`runtime.v1.PullImageRequest`; the v1alpha2 message has the same
field numbers): its `auth` is handed to `CapturedCredentials.capture` with the image
reference BEFORE the call is forwarded. A request that cannot be decoded, a bad reference or
a failed write is logged (never with a secret) and the call is forwarded all the same: the
proxy never fails a pull containerd would have served. Any other path is answered
UNIMPLEMENTED by grpcio, as containerd's image service would.

The server is grpcio's thread-pool server; each call blocks one worker thread for as long as
containerd takes (a pull can take minutes), so `threads` bounds concurrent calls.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..api import cri_images_pb2
from ..credentials.captured import CapturedCredentials, InvalidReferenceError

log = logging.getLogger(__name__)

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
"""The gRPC services forwarded (every method of each)."""

PULL_METHOD = "PullImage"

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest message forwarded either way (kubelet and containerd both use 16 MiB)."""

SOCKET_MODE = 0o660
"""Mode of the proxy's socket (as the daemon's own socket)."""


def _forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[tuple[str, Any]]:
    """Caller metadata containerd should see: everything but gRPC's own keys."""
    return [
        (k, v)
        for k, v in metadata or ()
        if not k.startswith(("grpc-", ":")) and k not in ("user-agent", "content-type", "te")
    ]


NO_DEADLINE_SEC = 10 * 365 * 24 * 3600.0
"""A remaining time beyond this means the caller set no deadline (grpcio reports an
infinite deadline as a huge or infinite number of seconds)."""


def _timeout(remaining: float | None) -> float | None:
    """The timeout to forward for the caller's remaining time: None when it has no deadline."""
    if remaining is None or not math.isfinite(remaining) or remaining > NO_DEADLINE_SEC:
        return None
    return remaining


class _Forwarder(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers every ImageService path with a unary handler that forwards raw bytes."""

    def __init__(self, channel: grpc.Channel, credentials: CapturedCredentials | None) -> None:
        self._channel = channel
        self._credentials = credentials
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        path: str = handler_call_details.method
        service, _, method = path.lstrip("/").partition("/")
        if service not in SERVICES or not method:
            return None
        handler = self._handlers.get(path)
        if handler is None:
            # request_deserializer/response_serializer None: the handler sees and returns bytes.
            handler = grpc.unary_unary_rpc_method_handler(self._forward_fn(path, method))
            self._handlers[path] = handler
        return handler

    def _forward_fn(self, path: str, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        upstream = self._channel.unary_unary(path)  # no serializers: bytes both ways

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            if method == PULL_METHOD and self._credentials is not None:
                self._capture(request)
            future = upstream.future(
                request,
                timeout=_timeout(context.time_remaining()),
                metadata=_forwardable(context.invocation_metadata()),
            )
            context.add_callback(future.cancel)
            try:
                response: bytes = future.result()
            except grpc.RpcError as e:
                code: grpc.StatusCode = e.code()
                details: str = e.details() or ""
                log.debug(
                    "forwarded call failed",
                    extra={"method": path, "code": code.name, "error": details},
                )
                context.set_trailing_metadata(_forwardable(e.trailing_metadata()))
                context.abort(code, details)
                raise AssertionError("unreachable: context.abort raises") from e  # pragma: no cover
            except grpc.FutureCancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "cancelled by the caller")
                raise AssertionError(
                    "unreachable: context.abort raises"
                ) from None  # pragma: no cover
            context.set_trailing_metadata(_forwardable(future.trailing_metadata()))
            return response

        return forward

    def _capture(self, request: bytes) -> None:
        assert self._credentials is not None
        try:
            pull = cri_images_pb2.PullImageRequest.FromString(request)
        except DecodeError:
            log.warning("PullImage request not decodable; forwarded without capture")
            return
        if not pull.HasField("auth"):
            return
        auth = pull.auth
        image = pull.image.image
        try:
            self._credentials.capture(
                image,
                username=auth.username,
                password=auth.password,
                auth=auth.auth,
                identity_token=auth.identity_token,
                registry_token=auth.registry_token,
                server_address=auth.server_address,
            )
        except InvalidReferenceError:
            log.warning(
                "PullImage credentials not kept: bad image reference", extra={"image": image}
            )
        except OSError as e:
            log.warning(
                "PullImage credentials not persisted",
                extra={"image": image, "error": e.strerror or type(e).__name__},
            )


class CriProxy:
    """The proxy serving on unix socket `address`, forwarding to containerd at `upstream`.

    `open()` binds and starts (the caller has made `address` bindable, e.g. with
    `daemon.prepare_socket_path`); `stop(grace)` stops serving, closes the upstream channel
    and removes the socket. `credentials` None forwards without capturing.
    """

    def __init__(
        self,
        address: Path,
        upstream: str | os.PathLike[str],
        credentials: CapturedCredentials | None,
        *,
        threads: int,
    ) -> None:
        self.address = address
        self.upstream = os.fspath(upstream)
        self._channel = grpc.insecure_channel(
            f"unix://{self.upstream}",
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cri-proxy"),
            handlers=[_Forwarder(self._channel, credentials)],
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )

    def __repr__(self) -> str:
        return f"<CriProxy {str(self.address)!r} -> {self.upstream!r}>"

    def open(self) -> None:
        """Bind `address` (mode 0660) and start serving. Raises OSError when it cannot bind."""
        if self._server.add_insecure_port(f"unix:{self.address}") == 0:
            self._channel.close()
            raise OSError(f"cannot listen on {str(self.address)!r}")
        os.chmod(self.address, SOCKET_MODE)
        self._server.start()
        log.info(
            "CRI image-service proxy serving",
            extra={"address": str(self.address), "upstream": self.upstream},
        )

    def stop(self, grace_sec: float | None) -> None:
        """Stop serving (in-flight calls get `grace_sec`), blocking until stopped; idempotent."""
        self._server.stop(grace_sec).wait()
        self._channel.close()
        self.address.unlink(missing_ok=True)
