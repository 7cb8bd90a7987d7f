"""The workers key and the pieces of the supervisor that need no process (the processes
themselves: tests/integration/test_supervisor.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmproxy.address import Address
from mmproxy.config import Config, ConfigError, load_config
from mmproxy.supervisor import share, worker_count

BASE = "listen: 127.0.0.1:2222\nipv4: 127.0.0.1:22\nallowed_networks: 127.0.0.0/8\n"


def load(tmp_path: Path, line: str) -> Config:
    path = tmp_path / "w.yaml"
    path.write_text(BASE + line)
    return load_config(str(path))


@pytest.mark.parametrize(("text", "count"), [("auto", 0), ("AUTO", 0), ("1", 1), ("4", 4)])
def test_workers_is_auto_or_a_count(tmp_path: Path, text: str, count: int) -> None:
    assert load(tmp_path, f"workers: {text}\n").workers == count


@pytest.mark.parametrize("text", ["0", "-1", "257", "many", "1.5"])
def test_a_bad_workers_value_says_what_is_expected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r'workers: expected an integer from 1 to 256 or "auto"'):
        load(tmp_path, f"workers: {text}\n")


def test_auto_is_one_worker_per_cpu_this_process_may_use() -> None:
    assert worker_count(Config()) == len(os.sched_getaffinity(0))
    assert worker_count(Config(listen=(Address("0.0.0.0", 53, "udp"),))) == 1  # UDP only
    assert worker_count(Config(workers=3)) == 3


def test_the_shares_of_max_connections_add_up_to_it() -> None:
    assert [share(Config(max_connections=10000), 2, i).max_connections for i in (0, 1)] == [
        5000,
        5000,
    ]
    assert [share(Config(max_connections=5), 3, i).max_connections for i in (0, 1, 2)] == [
        2,
        2,
        1,
    ]


def test_never_more_workers_than_max_connections() -> None:
    assert worker_count(Config(workers=4, max_connections=3)) == 3
