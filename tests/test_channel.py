"""mmproxy.channel: the supervisor's pipes to its workers (what multiprocessing.connection
did for it), over real pipes."""

from __future__ import annotations

import os
import threading

import pytest

from mmproxy.channel import pipe, wait
from mmproxy.stats import Snapshot


def test_messages_arrive_whole_and_in_order() -> None:
    reader, writer = pipe()
    try:
        assert not reader.poll()
        writer.send(("ready", Snapshot(), 0.5, None))
        writer.send(("stats", Snapshot(), 0.0, {"a": [1, 2]}))
        assert reader.poll(1.0)
        assert reader.recv() == ("ready", Snapshot(), 0.5, None)
        assert reader.recv() == ("stats", Snapshot(), 0.0, {"a": [1, 2]})
        assert not reader.poll()
    finally:
        reader.close()
        writer.close()


def test_a_message_larger_than_the_pipe_buffer() -> None:
    reader, writer = pipe()
    big = ["x" * 1000] * 1000  # about 1 MB, far above a pipe's 64 KiB
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(reader.recv()))
    thread.start()
    writer.send(big)
    thread.join(10)
    assert got == [big]
    reader.close()
    writer.close()


def test_the_end_closed() -> None:
    reader, writer = pipe()
    writer.close()
    assert reader.poll()  # readable: the end
    with pytest.raises(EOFError):
        reader.recv()
    reader.close()
    reader.close()  # twice is harmless
    with pytest.raises(OSError):
        reader.fileno()
    other_reader, other_writer = pipe()
    other_reader.close()
    with pytest.raises(BrokenPipeError):
        other_writer.send("nobody reads")
    other_writer.close()


def test_wait_returns_the_ready_channels_and_descriptors() -> None:
    a_in, a_out = pipe()
    b_in, b_out = pipe()
    r, w = os.pipe()
    try:
        assert wait([a_in, b_in, r], 0.01) == []
        b_out.send(1)
        os.write(w, b"!")
        assert set(map(id, wait([a_in, b_in, r], 1.0))) == {id(b_in), id(r)}
    finally:
        for channel in (a_in, a_out, b_in, b_out):
            channel.close()
        os.close(r)
        os.close(w)
