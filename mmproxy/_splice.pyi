# Type stub of the C extension mmproxy/_splice.c.
from collections.abc import Callable
from typing import Any

END_EOF: int
END_READ: int
END_WRITE: int
END_IDLE: int
END_HALF_CLOSED: int
END_CLOSED: int
END_RELAY: int

_Ended = list[tuple[Any, int, int, int, int, int]]

class Core:
    def __init__(self, epoll_fd: int, pipe_size: int = ..., keep_pipes: int = ...) -> None: ...
    def add(self, client_fd: int, upstream_fd: int, handle: Any, bytes_in: int = ...) -> None: ...
    def poll(self, timeout: float) -> tuple[list[tuple[int, int]], _Ended]: ...
    def sweep(self, idle_timeout: float, half_close_timeout: float) -> _Ended: ...
    def close_all(self) -> _Ended: ...
    def pipes(self) -> tuple[int, int]: ...
    def connections(self) -> list[tuple[Any, int, int]]: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...

def accept(listen_fd: int) -> tuple[int, str, int]: ...

CONNECT_KEEP_PORT: int
CONNECT_KEEPALIVE: int
CONNECT_DEFER_ACK: int

def connect(
    family: int,
    source_host: str | None,
    source_port: int,
    target_host: str,
    target_port: int,
    mark: int,
    options: int,
) -> tuple[int, str, int]: ...
def socket_error(fd: int) -> int: ...

# (version, command, family, source, destination, length): ProxyHeader's first fields.
HeaderValue = tuple[int, str, str, tuple[str, int] | None, tuple[str, int] | None, int]

def parse_header(data: bytes | bytearray | memoryview) -> HeaderValue | None: ...
def read_header(fd: int, size: int) -> tuple[bytes, HeaderValue | None]: ...

# (fd, host, port, data, header, errno, upstream_fd, sent)
HandedBack = tuple[int, str, int, bytes | None, HeaderValue | None, int, int, int]

def handshake(
    core: Core,
    listen_fd: int,
    limit: int,
    size: int,
    balancers: dict[str, bool],
    claims: dict[tuple[str, str], tuple[str, int]],
    mark: int,
    keepalive: bool,
    connection: Callable[[int, int, object, int], object],
) -> tuple[int, int, list[HandedBack], int, int]: ...
