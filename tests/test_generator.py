"""The systemd generator: socket drop-ins from the YAML files."""

from __future__ import annotations

from pathlib import Path

from mmproxy.generator import (
    MEMORY_PER_CONNECTION,
    MEMORY_PER_PROCESS,
    TASKS_EXTRA,
    TASKS_PER_PROCESS,
    generate,
)


def write(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text)


def test_one_dropin_per_instance(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc, "ssh.yaml", 'listen: "0.0.0.0:2222"\nipv4: "127.0.0.1:22"\n')
    write(etc, "web.yaml", 'listen: ["0.0.0.0:80", "[::]:80", "[::]:8080"]\n')
    write(etc, "example.yaml", 'listen: "0.0.0.0:2222"\n')
    assert generate(etc, out) == []
    assert not (out / "mmproxy@example.socket.d").exists()  # the shipped template
    ssh = (out / "mmproxy@ssh.socket.d" / "50-listen.conf").read_text()
    assert "[Socket]\nListenStream=0.0.0.0:2222\n" in ssh
    assert "BindIPv6Only" not in ssh
    web = (out / "mmproxy@web.socket.d" / "50-listen.conf").read_text()
    assert "ListenStream=[::]:80\nListenStream=[::]:8080\n" in web
    assert "BindIPv6Only=ipv6-only" in web


def test_a_bad_file_is_reported_and_skipped(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc, "bad.yaml", "listen: [unclosed\n")
    write(etc, "nolisten.yaml", 'ipv4: "127.0.0.1:22"\n')
    write(etc, "badaddr.yaml", 'listen: "localhost:22"\n')
    write(etc, "good.yaml", 'listen: "127.0.0.1:2222"\nmark: not-a-number\n')
    problems = generate(etc, out)
    assert len(problems) == 3
    assert any("nolisten.yaml" in p and "listen" in p for p in problems)
    assert any("127.0.0.1" in p for p in problems)  # the address error suggests the fix
    # Only `listen:` matters here: the service reports the bad mark when it starts.
    assert (out / "mmproxy@good.socket.d" / "50-listen.conf").exists()


def test_udp_listeners_become_datagram_sockets(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc, "dns.yaml", 'listen: ["0.0.0.0:53", "udp://0.0.0.0:53", "udp://[::1]:5353"]\n')
    assert generate(etc, out) == []
    dns = (out / "mmproxy@dns.socket.d" / "50-listen.conf").read_text()
    expected = "ListenStream=0.0.0.0:53\nListenDatagram=0.0.0.0:53\nListenDatagram=[::1]:5353\n"
    assert expected in dns
    assert "BindIPv6Only" not in dns  # no IPv6 wildcard beside an IPv4 one on the same port


def test_port_ranges_become_one_socket_line_per_port(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc, "game.yaml", 'listen: ["0.0.0.0:27015-27017", "udp://[::]:7000-7001"]\n')
    assert generate(etc, out) == []
    game = (out / "mmproxy@game.socket.d" / "50-listen.conf").read_text()
    expected = (
        "ListenStream=0.0.0.0:27015\nListenStream=0.0.0.0:27016\nListenStream=0.0.0.0:27017\n"
        "ListenDatagram=[::]:7000\nListenDatagram=[::]:7001\n"
    )
    assert expected in game


def test_a_range_past_the_cap_is_reported_and_skipped(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc, "wide.yaml", 'listen: "0.0.0.0:10000-11024"\n')  # 1,025 ports
    write(etc, "cap.yaml", 'listen: "0.0.0.0:10000-11023"\n')  # 1,024: allowed
    [problem] = generate(etc, out)
    assert "wide.yaml" in problem and "at most 1024" in problem and "TPROXY" in problem
    assert not (out / "mmproxy@wide.socket.d").exists()
    cap = (out / "mmproxy@cap.socket.d" / "50-listen.conf").read_text()
    assert cap.count("ListenStream=") == 1024


def test_the_service_gets_memory_and_task_ceilings_sized_from_its_file(tmp_path: Path) -> None:
    etc, out = tmp_path / "etc", tmp_path / "out"
    etc.mkdir()
    write(etc, "big.yaml", 'listen: "0.0.0.0:2222"\nmax_connections: 40000\nworkers: 4\n')
    write(etc, "one.yaml", 'listen: "0.0.0.0:2223"\nmax_connections: 100\nworkers: 1\n')
    write(etc, "odd.yaml", 'listen: "0.0.0.0:2224"\nmax_connections: lots\nworkers: 1\n')
    assert generate(etc, out) == []

    def limits(name: str) -> dict[str, int]:
        text = (out / f"mmproxy@{name}.service.d" / "50-limits.conf").read_text()
        assert "[Service]\n" in text
        pairs = (line.split("=") for line in text.splitlines() if "=" in line)
        return {key: int(value) for key, value in pairs}

    # 4 workers and their supervisor: 5 processes.
    assert limits("big") == {
        "MemoryMax": 5 * MEMORY_PER_PROCESS + 40000 * MEMORY_PER_CONNECTION,
        "TasksMax": 5 * TASKS_PER_PROCESS + TASKS_EXTRA,
    }
    assert limits("one")["MemoryMax"] == MEMORY_PER_PROCESS + 100 * MEMORY_PER_CONNECTION
    assert limits("big")["MemoryMax"] > limits("one")["MemoryMax"]
    # A bad value falls back to the defaults here; the service reports it at its start.
    assert limits("odd")["MemoryMax"] == MEMORY_PER_PROCESS + 10000 * MEMORY_PER_CONNECTION
