"""Pull an image through containerd's CRI `ImageService.PullImage`, so the lazy path is taken.

A pull through CRI is what kubelet does: containerd's CRI plugin annotates every layer with
the `cri.*` labels (with `disable_snapshot_annotations = false`) and unpacks into CRI's
snapshotter (`snapshotter = "sociable"`), whose remote handshake then mounts indexed layers
lazily. `ctr images pull` sets none of these labels. Images land in containerd namespace
`k8s.io` (CRI's).

    python -m snapshotter.cri.pull [--address SOCK] [--user USER[:PASS]] [--timeout S] REF

`sociable pull` (index/pull.py) runs this module. The request and answer are encoded by
hand (`PullImageRequest{1: ImageSpec{1: image}, 2: AuthConfig{1: username, 2: password}}`,
`PullImageResponse{1: image_ref}`), so no CRI stubs are needed.
Exit status: 0 pulled (prints the image id), 1 failed (message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import grpc

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
PULL_METHOD = "/runtime.v1.ImageService/PullImage"


class CriPullError(Exception):
    """PullImage failed; the message names the image and containerd's answer."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_pull_request(image: str, username: str = "", password: str = "") -> bytes:
    """The wire bytes of `PullImageRequest` for `image`, with basic credentials if given."""
    out = _field(1, _field(1, image.encode()))
    if username:
        auth = _field(1, username.encode()) + (_field(2, password.encode()) if password else b"")
        out += _field(2, auth)
    return out


def decode_pull_response(data: bytes) -> str:
    """`PullImageResponse.image_ref` from its wire bytes. Raises CriPullError if malformed."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            if pos >= len(data):
                raise CriPullError("truncated PullImageResponse")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    ref = ""
    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 2:
            length = varint()
            payload = data[pos : pos + length]
            pos += length
            if number == 1:
                ref = payload.decode("utf-8", "replace")
        elif wire == 0:
            varint()
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise CriPullError(f"PullImageResponse: unsupported wire type {wire}")
    return ref


def pull_image(
    address: str, image: str, *, username: str = "", password: str = "", timeout_sec: float = 1800
) -> str:
    """PullImage `image` through CRI at unix socket `address`; returns the image id.

    Raises CriPullError with containerd's status code and message.
    """
    target = address if address.startswith("unix:") else f"unix://{address}"
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            PULL_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            answer = call(encode_pull_request(image, username, password), timeout=timeout_sec)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            raise CriPullError(f"pull {image} through CRI at {address}: {code}: {details}") from e
    return decode_pull_response(bytes(answer))


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sociable pull",
        description="pull an image through containerd's CRI so indexed layers load lazily",
    )
    p.add_argument("image", help="image reference, e.g. registry.example/app:1.0")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="containerd socket (%(default)s)")
    p.add_argument("--user", default="", help="registry credentials USER[:PASSWORD]")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds (%(default)s)")
    args = p.parse_args(argv)
    user, _, password = args.user.partition(":")
    start = time.monotonic()
    try:
        ref = pull_image(
            args.address, args.image, username=user, password=password, timeout_sec=args.timeout
        )
    except CriPullError as e:
        print(f"sociable pull: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.image}: pulled {ref} in {time.monotonic() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
