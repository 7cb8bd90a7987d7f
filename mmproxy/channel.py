"""One-way pipes of pickled messages between the supervisor and its workers: the part of
multiprocessing.connection that mmproxy uses (Pipe(duplex=False), send, recv, poll,
wait). multiprocessing brings pickle's helpers, tempfile, shutil, bz2, lzma and random
into every start-up, before the first connection is served (issue 15, the cold start).

A message is a 4-byte big-endian length, then the pickle. The other end gone: recv
raises EOFError, send OSError (BrokenPipeError), as multiprocessing's do."""

from __future__ import annotations

import os
import pickle
import select
import struct
from collections.abc import Sequence
from typing import Any

_LENGTH = struct.Struct("!I")


class Channel:
    """One end of a one-way pipe: a reader or a writer."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError("channel is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def send(self, message: object) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        view = memoryview(_LENGTH.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fileno(), view) :]

    def recv(self) -> Any:  # what the other end sent: the caller knows its shape
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return pickle.loads(self._read(length))

    def poll(self, timeout: float = 0.0) -> bool:
        """True when a message (or the end) can be read now, or within `timeout` s."""
        return bool(wait([self], timeout))

    def _read(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = os.read(self.fileno(), size)
            if not chunk:
                raise EOFError("the other end of the channel is closed")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


def pipe() -> tuple[Channel, Channel]:
    """(reader, writer), close-on-exec (the workers are forked, never exec'd)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    return Channel(read_end), Channel(write_end)


def wait(objects: Sequence[Channel | int], timeout: float | None) -> list[Channel | int]:
    """The ones of `objects` (channels, or file descriptors) that can be read now, or
    within `timeout` s (None: no limit); an end that was closed counts as readable."""
    poller = select.poll()
    by_fd: dict[int, Channel | int] = {}
    for item in objects:
        fd = item if isinstance(item, int) else item.fileno()
        by_fd[fd] = item
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return [by_fd[fd] for fd, _ in poller.poll(ms)]
