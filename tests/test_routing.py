from mmproxy.routing import lo_commands, mark_commands


def test_lo_commands_use_the_table() -> None:
    text = [" ".join(c) for c in lo_commands(42)]
    assert "ip -4 rule add from 127.0.0.1/8 iif lo table 42" in text
    assert "ip -6 route add local ::/0 dev lo table 42" in text


def test_mark_commands_use_mark_and_table() -> None:
    text = [" ".join(c) for c in mark_commands(7, 42)]
    assert "ip -4 rule add fwmark 7/0xffffffff lookup 42" in text
    assert any(t.startswith("ip6tables -t mangle -I OUTPUT -m connmark --mark 7") for t in text)
