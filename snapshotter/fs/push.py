"""Pushing small files into the kernel's page cache before they are read.

Reading a small file through a container's overlayfs costs two requests the reader waits
for: overlayfs's GETXATTR when it looks the name up in the lower layer, and the READ. Where
waking the daemon's CPU is slow (a VM with halt polling off: ~90 us a wakeup), those round
trips, not the daemon's work, bound how fast a container reads many small files. So when a
READ starts a file (offset 0), the server also gives the kernel the small files that follow
it in the layer's tar order, whole, if their bytes are already at hand (decompressed in
memory or in the inflated tier's page cache: nothing is fetched for this), with
`FUSE_NOTIFY_STORE`; a reader that goes on to them (an interpreter importing a package, a
scan of a directory) finds their bytes in the page cache and sends no READ.

What a container sees does not change: the bytes pushed are the layer's own, checked like a
READ's (tar header, span digest, block sums), and files keep their page cache across opens
(`FOPEN_KEEP_CACHE`, or OPEN not sent at all). A file pushed is not pushed again until a READ
shows the kernel lacks it (evicted, or the push came too late) or `RECENT` newer pushes have
passed (it may have been evicted since). The
kernel only takes a store for an inode it knows (listed or looked up); others fail with
ENOENT, which costs a write and nothing else.

The stores are written by a worker thread of the connection's own (`Pusher.run`, in the
server's nursery) from a `dup` of its fd, taking them from a queue as the trio thread finds
them, so the first file is in the page cache while the next ones are still being looked at.
A store waits for the page lock of a READ in flight on the same pages, which only the trio
thread can answer: files with a READ in flight in this process are not pushed, and an orderly
stop ends the writer (`Pusher.finish`) while the server still answers. What is left is a
store that meets a READ the kernel queued when the process dies: it waits until the
connection's next server (or its end) answers that READ.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
from collections import Counter
from typing import Final

import trio

from snapshotter.fs import protocol as p
from snapshotter.fs.host import LayerHost
from snapshotter.fs.inodes import split_inode

log = logging.getLogger(__name__)

DEFAULT_PUSH_BYTES: Final = 512 * 1024
"""Bytes pushed after one READ, at most (`[remote] push_after_read_bytes` sets it)."""
PUSH_MAX_FILE_BYTES: Final = 128 * 1024
"""The largest file pushed: larger ones cost one READ per MiB at most, and may be passed
through (`passthrough_min_file_bytes`)."""
PUSH_CHUNK_BYTES: Final = 256 * 1024
"""Tar stream read at once for a run of files to push: as much as the inflated tier reads on
the trio thread (`snapshotter.lazy.inflater.INLINE_TIER_READ_BYTES`; larger reads of it would
need a worker thread, and are not pushed)."""
PUSH_SCAN_NODES: Final = 64
"""Tar entries looked at after the file read (directories and links among them)."""
MAX_QUEUED: Final = 256
"""Stores waiting for the writer thread; past it nothing is pushed (the writer is behind)."""
RECENT: Final = 8192
"""Pushed inodes remembered (not pushed again) per connection, the oldest forgotten first:
a file evicted from the page cache since is pushed again once it is forgotten."""


class _Skip:
    """The inodes not to push: pushed recently, or with a READ in flight."""

    __slots__ = ("pushed", "reading")

    def __init__(self, pushed: dict[int, None], reading: Counter[int]) -> None:
        self.pushed = pushed
        self.reading = reading

    def __contains__(self, inode: object) -> bool:
        return inode in self.pushed or inode in self.reading


class Pusher:
    """The stores of one connection: which files to push after a READ (`after_read`, on the
    trio thread) and the worker thread that writes them (`run`)."""

    def __init__(self, host: LayerHost, fd: int, max_bytes: int) -> None:
        self.host = host
        self.max_bytes = max_bytes
        self.files = 0
        """Stores the kernel took."""
        self.bytes = 0
        self.unknown = 0
        """Stores the kernel refused because it did not know the inode (ENOENT)."""
        self.skipped = 0
        """Files not pushed because `MAX_QUEUED` stores were waiting."""
        self.reading: Counter[int] = Counter()
        """READs in flight in this process, by inode (`read_started`, `read_ended`)."""
        self.limiter = trio.CapacityLimiter(1)
        """The connection's writer thread (one: stores are written in the order found)."""
        self._recent: dict[int, None] = {}  # pushed inodes, oldest first
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._fd = os.dup(fd)
        self._closed = False
        self._started = False
        self._done = trio.Event()

    def __repr__(self) -> str:
        return f"<Pusher files={self.files} bytes={self.bytes} unknown={self.unknown}>"

    def statistics(self) -> dict[str, int]:
        """For `status.json`: stores taken (files, bytes), refused (unknown inode), files
        not pushed (writer behind)."""
        return {
            "files": self.files,
            "bytes": self.bytes,
            "unknownInode": self.unknown,
            "skipped": self.skipped,
        }

    def after_read(self, request: bytes | memoryview) -> int:
        """After the answer to READ `request`: queue the stores of what follows its file when
        it read from the start. Returns how many files were queued."""
        if self.max_bytes <= 0 or self._closed:
            return 0
        nodeid = p.IN_HEADER.unpack_from(request)[3]
        offset = p.READ_IN.unpack_from(request, p.IN_HEADER.size)[1]
        recent = self._recent
        recent.pop(nodeid, None)  # read: the kernel does not have (or no longer has) its bytes
        if offset != 0:
            return 0
        if self._queue.qsize() >= MAX_QUEUED:
            self.skipped += 1
            return 0
        queued = 0
        files = self.host.files_after(
            nodeid,
            max_bytes=self.max_bytes,
            max_file_bytes=PUSH_MAX_FILE_BYTES,
            scan=PUSH_SCAN_NODES,
            skip=_Skip(recent, self.reading),
            chunk_bytes=PUSH_CHUNK_BYTES,
        )
        for inode, data in files:
            recent[inode] = None
            self._queue.put(p.store_notification(inode, data))
            queued += 1
        while len(recent) > RECENT:
            del recent[next(iter(recent))]
        return queued

    def read_started(self, nodeid: int) -> None:
        """A READ of `nodeid` waits in a task: its file is not pushed until it is answered."""
        self.reading[nodeid] += 1

    def read_ended(self, nodeid: int) -> None:
        self.reading[nodeid] -= 1
        if not self.reading[nodeid]:
            del self.reading[nodeid]

    def forget_layer(self, slot: int) -> None:
        """Layer `slot` was removed: its inode numbers may name another layer's files."""
        for inode in [i for i in self._recent if split_inode(i)[0] == slot]:
            del self._recent[inode]

    def close(self) -> None:
        """Write nothing more; the writer thread closes its fd when it ends (or this, when
        it never started)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if not self._started:
            os.close(self._fd)

    async def run(self) -> None:
        """The writer: a worker thread writing the queued stores until `close` (abandoned at
        a cancellation: it ends at the `close` that follows, or its store's READ answer)."""
        if self._closed or self._started:
            return
        self._started = True
        try:
            await trio.to_thread.run_sync(
                self._write_all, limiter=self.limiter, abandon_on_cancel=True
            )
        finally:
            self._done.set()

    async def finish(self, timeout_sec: float) -> bool:
        """`close`, then wait up to `timeout_sec` for the writer thread to end; returns
        whether it did. Called while the server still answers requests: a store being written
        may wait for a READ only the server can answer (stopped first, the store would wait for
        the connection's next server, and this process could not exit until then)."""
        self.close()
        if self._started:
            with trio.move_on_after(timeout_sec):
                await self._done.wait()
        return self._done.is_set() or not self._started

    def _write_all(self) -> None:
        try:
            while (buffers := self._queue.get()) is not None and not self._closed:
                try:
                    os.writev(self._fd, buffers)  # one notification per write(2)
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        self.unknown += 1
                        continue
                    if e.errno in (errno.ENODEV, errno.EBADF):
                        return  # the connection ended
                    log.debug("fuse store not written", extra={"error": str(e)})
                    continue
                self.files += 1
                self.bytes += len(buffers[2])
        finally:
            os.close(self._fd)
