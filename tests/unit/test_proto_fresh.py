"""The committed gRPC stubs in snapshotter/api are exactly what proto/generate.sh makes."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(["sh", str(REPO / "proto" / "generate.sh"), str(tmp_path)], check=True)
    fresh = tmp_path / "snapshotter" / "api"
    committed = REPO / "snapshotter" / "api"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix == ".py")
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, (
        f"stale generated stubs {mismatch + errors}: run proto/generate.sh"
    )


def test_wire_names_match_containerd() -> None:
    from snapshotter.api import mount_pb2, snapshots_pb2

    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert sorted(m.name for m in svc.methods) == sorted(
        [
            "Prepare",
            "View",
            "Mounts",
            "Commit",
            "Remove",
            "Stat",
            "Update",
            "List",
            "Usage",
            "Cleanup",
        ]
    )
    assert svc.methods_by_name["List"].server_streaming
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    fields = {f.name: f.number for f in snapshots_pb2.CommitSnapshotRequest.DESCRIPTOR.fields}
    assert fields == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4, "parent": 5}
    info = {f.name: f.number for f in snapshots_pb2.Info.DESCRIPTOR.fields}
    assert info == {
        "name": 1,
        "parent": 2,
        "kind": 3,
        "created_at": 4,
        "updated_at": 5,
        "labels": 6,
    }
    kinds = {v.name: v.number for v in snapshots_pb2.DESCRIPTOR.enum_types_by_name["Kind"].values}
    assert kinds == {"UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}
    usage = {f.name: f.number for f in snapshots_pb2.UsageResponse.DESCRIPTOR.fields}
    assert usage == {"size": 1, "inodes": 2}


def test_content_wire_names_match_containerd() -> None:
    """The Content subset has containerd's package, service, method paths and field numbers
    (api/services/content/v1/content.proto), so containerd decodes what we send."""
    from snapshotter.api import content_pb2, content_pb2_grpc

    svc = content_pb2.DESCRIPTOR.services_by_name["Content"]
    assert svc.full_name == "containerd.services.content.v1.Content"
    assert sorted(m.name for m in svc.methods) == ["Info", "Read"]
    info_rpc, read_rpc = svc.methods_by_name["Info"], svc.methods_by_name["Read"]
    assert not info_rpc.server_streaming and not info_rpc.client_streaming
    assert read_rpc.server_streaming and not read_rpc.client_streaming
    assert info_rpc.input_type.full_name == "containerd.services.content.v1.InfoRequest"
    assert info_rpc.output_type.full_name == "containerd.services.content.v1.InfoResponse"
    assert read_rpc.input_type.full_name == "containerd.services.content.v1.ReadContentRequest"
    assert read_rpc.output_type.full_name == "containerd.services.content.v1.ReadContentResponse"

    def numbers(message: type) -> dict[str, tuple[int, int]]:
        d = message.DESCRIPTOR  # type: ignore[attr-defined]
        return {f.name: (f.number, f.type) for f in d.fields}

    F = content_pb2.Info.DESCRIPTOR.fields_by_name["size"]
    string, int64, bytes_, message = F.TYPE_STRING, F.TYPE_INT64, F.TYPE_BYTES, F.TYPE_MESSAGE
    assert numbers(content_pb2.Info) == {
        "digest": (1, string),
        "size": (2, int64),
        "labels": (5, message),
    }
    assert numbers(content_pb2.InfoRequest) == {"digest": (1, string)}
    assert numbers(content_pb2.InfoResponse) == {"info": (1, message)}
    assert numbers(content_pb2.ReadContentRequest) == {
        "digest": (1, string),
        "offset": (2, int64),
        "size": (3, int64),
    }
    assert numbers(content_pb2.ReadContentResponse) == {"offset": (1, int64), "data": (2, bytes_)}

    class Recorder:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, **_: object) -> None:
            self.paths.append(path)

        def unary_stream(self, path: str, **_: object) -> None:
            self.paths.append(path)

    channel = Recorder()
    content_pb2_grpc.ContentStub(channel)
    assert sorted(channel.paths) == [
        "/containerd.services.content.v1.Content/Info",
        "/containerd.services.content.v1.Content/Read",
    ]


def test_content_info_skips_the_fields_left_out() -> None:
    """containerd's Info carries created_at (3) and updated_at (4) Timestamps; our subset
    decodes such an answer, skips them and keeps digest, size and labels (a wrong number
    for labels would read a Timestamp as a label or drop the labels)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    from snapshotter.api import content_pb2

    full = descriptor_pb2.FileDescriptorProto(
        name="full_info.proto", package="full", syntax="proto3"
    )
    full.dependency.append("google/protobuf/timestamp.proto")
    F = descriptor_pb2.FieldDescriptorProto
    m = full.message_type.add(name="Info")
    m.field.add(name="digest", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    m.field.add(name="size", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    for name, number in (("created_at", 3), ("updated_at", 4)):
        m.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            type_name=".google.protobuf.Timestamp",
        )
    entry = m.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    m.field.add(
        name="labels",
        number=5,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".full.Info.LabelsEntry",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(full)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("full.Info"))
    sent = cls(digest="sha256:" + "a" * 64, size=1 << 40)
    sent.created_at.seconds = 1_700_000_000
    sent.updated_at.nanos = 5
    sent.labels["containerd.io/distribution.source.example.com"] = "library/busybox"
    got = content_pb2.Info.FromString(sent.SerializeToString())
    assert got.digest == "sha256:" + "a" * 64
    assert got.size == 1 << 40
    assert dict(got.labels) == {"containerd.io/distribution.source.example.com": "library/busybox"}


def test_images_wire_names_match_containerd() -> None:
    """The Images subset has containerd's package, service, method path and field numbers
    (api/services/images/v1/images.proto, api/types/descriptor.proto)."""
    from snapshotter.api import images_pb2, images_pb2_grpc

    svc = images_pb2.DESCRIPTOR.services_by_name["Images"]
    assert svc.full_name == "containerd.services.images.v1.Images"
    assert [m.name for m in svc.methods] == ["Get"]
    get = svc.methods_by_name["Get"]
    assert not get.server_streaming and not get.client_streaming
    assert get.input_type.full_name == "containerd.services.images.v1.GetImageRequest"
    assert get.output_type.full_name == "containerd.services.images.v1.GetImageResponse"

    def numbers(message: type) -> dict[str, tuple[int, int]]:
        d = message.DESCRIPTOR  # type: ignore[attr-defined]
        return {f.name: (f.number, f.type) for f in d.fields}

    F = images_pb2.Descriptor.DESCRIPTOR.fields_by_name["size"]
    string, int64, message = F.TYPE_STRING, F.TYPE_INT64, F.TYPE_MESSAGE
    assert numbers(images_pb2.GetImageRequest) == {"name": (1, string)}
    assert numbers(images_pb2.GetImageResponse) == {"image": (1, message)}
    assert numbers(images_pb2.Image) == {"name": (1, string), "target": (3, message)}
    assert numbers(images_pb2.Descriptor) == {
        "media_type": (1, string),
        "digest": (2, string),
        "size": (3, int64),
    }

    class Recorder:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, **_: object) -> None:
            self.paths.append(path)

    channel = Recorder()
    images_pb2_grpc.ImagesStub(channel)
    assert channel.paths == ["/containerd.services.images.v1.Images/Get"]


def test_image_skips_the_fields_left_out() -> None:
    """containerd's Image carries labels (2), created_at (7) and updated_at (8), and its
    Descriptor annotations (5); our subset decodes such an answer and keeps the name and the
    target (a wrong number for target would drop it or read the labels as a descriptor)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    from snapshotter.api import images_pb2

    full = descriptor_pb2.FileDescriptorProto(
        name="full_image.proto", package="full", syntax="proto3"
    )
    full.dependency.append("google/protobuf/timestamp.proto")
    F = descriptor_pb2.FieldDescriptorProto

    def string_map(message: descriptor_pb2.DescriptorProto, name: str, number: int) -> None:
        entry_name = "".join(p.title() for p in name.split("_")) + "Entry"
        entry = message.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
        message.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_REPEATED,
            type_name=f".full.{message.name}.{entry_name}",
        )

    d = full.message_type.add(name="Descriptor")
    d.field.add(name="media_type", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    d.field.add(name="digest", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    d.field.add(name="size", number=3, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    string_map(d, "annotations", 5)
    m = full.message_type.add(name="Image")
    m.field.add(name="name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    string_map(m, "labels", 2)
    m.field.add(
        name="target",
        number=3,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".full.Descriptor",
    )
    for name, number in (("created_at", 7), ("updated_at", 8)):
        m.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            type_name=".google.protobuf.Timestamp",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(full)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("full.Image"))
    sent = cls(name="docker.io/library/busybox:1.36")
    sent.labels["io.cri-containerd.image"] = "managed"
    sent.target.media_type = "application/vnd.oci.image.index.v1+json"
    sent.target.digest = "sha256:" + "b" * 64
    sent.target.size = 9 << 30
    sent.target.annotations["org.opencontainers.image.ref.name"] = "1.36"
    sent.created_at.seconds = 1_700_000_000
    sent.updated_at.nanos = 5
    got = images_pb2.Image.FromString(sent.SerializeToString())
    assert got.name == "docker.io/library/busybox:1.36"
    assert got.target.media_type == "application/vnd.oci.image.index.v1+json"
    assert got.target.digest == "sha256:" + "b" * 64
    assert got.target.size == 9 << 30


def test_cri_image_service_wire_names_match_cri_api() -> None:
    """The CRI ImageService has cri-api's package, service, method paths and field numbers
    (pkg/apis/runtime/v1/api.proto, v0.25 as containerd 1.6 serves it), so kubelet's bytes
    decode and containerd's answers pass through unchanged."""
    from snapshotter.api import cri_images_pb2 as cri
    from snapshotter.api import cri_images_pb2_grpc

    svc = cri.DESCRIPTOR.services_by_name["ImageService"]
    assert svc.full_name == "runtime.v1.ImageService"
    rpcs = {m.name: (m.input_type.name, m.output_type.name) for m in svc.methods}
    assert rpcs == {
        "ListImages": ("ListImagesRequest", "ListImagesResponse"),
        "ImageStatus": ("ImageStatusRequest", "ImageStatusResponse"),
        "PullImage": ("PullImageRequest", "PullImageResponse"),
        "RemoveImage": ("RemoveImageRequest", "RemoveImageResponse"),
        "ImageFsInfo": ("ImageFsInfoRequest", "ImageFsInfoResponse"),
    }
    assert not any(m.server_streaming or m.client_streaming for m in svc.methods)

    def numbers(message: type) -> dict[str, tuple[int, int, str]]:
        d = message.DESCRIPTOR  # type: ignore[attr-defined]
        return {
            f.name: (f.number, f.type, f.message_type.name if f.message_type else "")
            for f in d.fields
        }

    F = cri.AuthConfig.DESCRIPTOR.fields_by_name["username"]
    s, msg, i64, u64, u32, b = (
        F.TYPE_STRING,
        F.TYPE_MESSAGE,
        F.TYPE_INT64,
        F.TYPE_UINT64,
        F.TYPE_UINT32,
        F.TYPE_BOOL,
    )
    assert numbers(cri.AuthConfig) == {
        "username": (1, s, ""),
        "password": (2, s, ""),
        "auth": (3, s, ""),
        "server_address": (4, s, ""),
        "identity_token": (5, s, ""),
        "registry_token": (6, s, ""),
    }
    assert numbers(cri.ImageSpec) == {
        "image": (1, s, ""),
        "annotations": (2, msg, "AnnotationsEntry"),
    }
    assert numbers(cri.PullImageRequest) == {
        "image": (1, msg, "ImageSpec"),
        "auth": (2, msg, "AuthConfig"),
        "sandbox_config": (3, msg, "PodSandboxConfig"),
    }
    assert numbers(cri.PullImageResponse) == {"image_ref": (1, s, "")}
    assert numbers(cri.PodSandboxConfig) == {
        "metadata": (1, msg, "PodSandboxMetadata"),
        "hostname": (2, s, ""),
        "log_directory": (3, s, ""),
        "labels": (6, msg, "LabelsEntry"),
        "annotations": (7, msg, "AnnotationsEntry"),
    }
    assert numbers(cri.PodSandboxMetadata) == {
        "name": (1, s, ""),
        "uid": (2, s, ""),
        "namespace": (3, s, ""),
        "attempt": (4, u32, ""),
    }
    assert numbers(cri.ListImagesRequest) == {"filter": (1, msg, "ImageFilter")}
    assert numbers(cri.ImageFilter) == {"image": (1, msg, "ImageSpec")}
    assert numbers(cri.ListImagesResponse) == {"images": (1, msg, "Image")}
    assert numbers(cri.Image) == {
        "id": (1, s, ""),
        "repo_tags": (2, s, ""),
        "repo_digests": (3, s, ""),
        "size": (4, u64, ""),
        "uid": (5, msg, "Int64Value"),
        "username": (6, s, ""),
        "spec": (7, msg, "ImageSpec"),
        "pinned": (8, b, ""),
    }
    assert numbers(cri.Int64Value) == {"value": (1, i64, "")}
    assert numbers(cri.UInt64Value) == {"value": (1, u64, "")}
    assert numbers(cri.ImageStatusRequest) == {
        "image": (1, msg, "ImageSpec"),
        "verbose": (2, b, ""),
    }
    assert numbers(cri.ImageStatusResponse) == {
        "image": (1, msg, "Image"),
        "info": (2, msg, "InfoEntry"),
    }
    assert numbers(cri.RemoveImageRequest) == {"image": (1, msg, "ImageSpec")}
    assert numbers(cri.RemoveImageResponse) == {}
    assert numbers(cri.ImageFsInfoRequest) == {}
    assert numbers(cri.ImageFsInfoResponse) == {"image_filesystems": (1, msg, "FilesystemUsage")}
    assert numbers(cri.FilesystemUsage) == {
        "timestamp": (1, i64, ""),
        "fs_id": (2, msg, "FilesystemIdentifier"),
        "used_bytes": (3, msg, "UInt64Value"),
        "inodes_used": (4, msg, "UInt64Value"),
    }
    assert numbers(cri.FilesystemIdentifier) == {"mountpoint": (1, s, "")}

    class Recorder:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, **_: object) -> None:
            self.paths.append(path)

    channel = Recorder()
    cri_images_pb2_grpc.ImageServiceStub(channel)
    assert sorted(channel.paths) == sorted(
        f"/runtime.v1.ImageService/{m}"
        for m in ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")
    )
