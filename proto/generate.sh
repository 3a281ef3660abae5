#!/bin/sh
# Regenerate the Python stubs for containerd's Snapshots API, the part of its
# Content API the daemon reads blobs with, the part of its Images API it
# resolves tags with, and CRI's ImageService (runtime.v1) the image-service
# proxy decodes PullImage with.
#
# Usage: proto/generate.sh [OUTPUT_ROOT]
#   OUTPUT_ROOT defaults to the repository root; the stubs land in
#   OUTPUT_ROOT/snapshotter/api. The .proto files live under
#   proto/snapshotter/api so that generated imports read
#   "from snapshotter.api import mount_pb2" (no top-level "types" package).
# Needs grpcio-tools (python3 -m grpc_tools.protoc). Never edit the output.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(dirname "$here")}
mkdir -p "$out/snapshotter/api"
python3 -m grpc_tools.protoc \
    -I "$here" \
    --python_out="$out" \
    --grpc_python_out="$out" \
    "$here/snapshotter/api/content.proto" \
    "$here/snapshotter/api/cri_images.proto" \
    "$here/snapshotter/api/images.proto" \
    "$here/snapshotter/api/mount.proto" \
    "$here/snapshotter/api/snapshots.proto"
printf '"""Generated containerd Snapshots, Content and Images API and CRI ImageService stubs (proto/generate.sh); do not edit."""\n' \
    > "$out/snapshotter/api/__init__.py"
