"""Reading the small files an administrator points mmproxy at: configuration, networks.

They are read as root by the generator (early at boot) and the routing helper, so a
mistake or a trap (a FIFO that never ends, /dev/zero, a 10 GB log) must be refused, not
followed: only regular files, and at most MAX_FILE_BYTES of them.
"""

from __future__ import annotations

import os
import stat

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a thousand times the largest real configuration

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class FileRefused(Exception):
    """A file that cannot or may not be read; str() says why, without the path."""


def read_small_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at `path` (symbolic links followed), at most `limit`."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise FileRefused(exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise FileRefused(f"expected a regular file, got {kind}")
        data = _read_at_most(fd, limit + 1)
    except OSError as exc:
        raise FileRefused(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileRefused(f"larger than {_size(limit)}, the most mmproxy reads")
    return data


def _read_at_most(fd: int, count: int) -> bytes:
    chunks: list[bytes] = []
    while count > 0:
        chunk = os.read(fd, min(count, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and limit % (1 << 20) == 0 else f"{limit} bytes"
