"""FUSE requests as the kernel writes them and their replies decoded, for unit tests of the
server's handlers (`snapshotter.fs.fuse.FuseOperations`) without a mount."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapshotter.fs import protocol as p
from snapshotter.fs.fuse import FuseOperations


def request(
    opcode: int, nodeid: int, body: bytes = b"", *, unique: int = 2, uid: int = 0, gid: int = 0
) -> bytes:
    length = p.IN_HEADER.size + len(body)
    return p.IN_HEADER.pack(length, opcode, unique, nodeid, uid, gid, 1, 0, 0) + body


@dataclass(frozen=True)
class Reply:
    error: int  # a positive errno, 0 for success
    unique: int
    payload: bytes


def parse_reply(raw: bytes) -> Reply:
    length, error, unique = p.OUT_HEADER.unpack_from(raw)
    assert length == len(raw), (length, len(raw))
    return Reply(-error, unique, raw[p.OUT_HEADER.size :])


@dataclass(frozen=True)
class Entry:
    nodeid: int
    entry_timeout: float
    attr_timeout: float
    ino: int
    size: int
    mode: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int


def parse_attr(raw: bytes, entry_timeout: float, attr_timeout: float, nodeid: int) -> Entry:
    ino, size, _blocks, _at, mtime, _ct, _atn, mtimensec, _ctn, mode, nlink, uid, gid, *_ = (
        p.ATTR.unpack_from(raw)
    )
    return Entry(
        nodeid, entry_timeout, attr_timeout, ino, size, mode, nlink, uid, gid,
        mtime * 1_000_000_000 + mtimensec,
    )  # fmt: skip


def parse_entry(payload: bytes) -> Entry:
    nodeid, _gen, ev, av, evn, avn = p.ENTRY_OUT_HEAD.unpack_from(payload)
    return parse_attr(payload[p.ENTRY_OUT_HEAD.size :], ev + evn / 1e9, av + avn / 1e9, nodeid)


def parse_attr_out(payload: bytes) -> Entry:
    av, avn, _ = p.ATTR_OUT_HEAD.unpack_from(payload)
    return parse_attr(payload[p.ATTR_OUT_HEAD.size :], 0.0, av + avn / 1e9, 0)


class Client:
    """Calls a `FuseOperations` the way the kernel would; failures raise `Failed`."""

    def __init__(self, ops: FuseOperations) -> None:
        self.ops = ops

    def call(self, opcode: int, nodeid: int, body: bytes = b"", **kw: int) -> bytes:
        raw = self.ops.handle(request(opcode, nodeid, body, **kw))
        assert raw is not None
        reply = parse_reply(raw)
        if reply.error:
            raise Failed(reply.error)
        return reply.payload

    def lookup(self, parent: int, name: bytes) -> Entry:
        return parse_entry(self.call(p.LOOKUP, parent, name + b"\0"))

    def getattr(self, inode: int) -> Entry:
        return parse_attr_out(self.call(p.GETATTR, inode, bytes(16)))

    def getxattr(self, inode: int, name: bytes, size: int = 4096) -> bytes:
        return self.call(p.GETXATTR, inode, p.GETXATTR_IN.pack(size, 0) + name + b"\0")

    def listxattr(self, inode: int, size: int = 4096) -> bytes:
        return self.call(p.LISTXATTR, inode, p.GETXATTR_IN.pack(size, 0))

    def statfs(self) -> tuple[int, ...]:
        return p.KSTATFS.unpack(self.call(p.STATFS, 1))

    def readdirplus(
        self, inode: int, offset: int = 0, size: int = 65536
    ) -> list[tuple[bytes, Entry]]:
        fh = struct.unpack_from("<Q", self.call(p.OPENDIR, inode, bytes(8)))[0]
        payload = self.call(p.READDIRPLUS, inode, p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        out = []
        pos = 0
        while pos < len(payload):
            entry = parse_entry(payload[pos:])
            pos += p.ENTRY_OUT_SIZE
            _ino, _off, namelen, _type = p.DIRENT.unpack_from(payload, pos)
            name = payload[pos + p.DIRENT.size : pos + p.DIRENT.size + namelen]
            pos += p.DIRENT.size + namelen + (-(p.DIRENT.size + namelen) % 8)
            out.append((name, entry))
        return out

    async def read(self, inode: int, offset: int, size: int) -> bytes:
        raw = b"".join(
            await self.ops.read(request(p.READ, inode, p.READ_IN.pack(0, offset, size, 0, 0, 0, 0)))
        )
        reply = parse_reply(raw)
        if reply.error:
            raise Failed(reply.error)
        return reply.payload


class Failed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.errno = code
