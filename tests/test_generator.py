"""The systemd generator: socket drop-ins from the YAML files."""

from __future__ import annotations

from pathlib import Path

from mmproxy.generator import generate


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
