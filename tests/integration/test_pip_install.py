"""pip: `python -m build` makes an sdist that carries the C part's source, `pip wheel`
turns it into a platform wheel with the compiled extension, and that wheel installs into
a fresh virtualenv that does not see Debian's packages (its dependencies come from the
package index). The installed `mmproxy` then relays a spoofed connection in a network
namespace. The system needs what the README lists: a compiler, the Python headers, and
libsystemd-dev and pkg-config for systemd-python (Makefile APT_PACKAGES)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mmproxy.proxy_protocol import encode_v1

from .conftest import CLIENT4, MARK, TABLE, Mmproxy, Net, start_backend

REPO = Path(__file__).resolve().parents[2]
NOT_SOURCE = (".git", ".venv", "build", "dist", "__pycache__", "*.egg-info", "*.so", ".*cache")


def run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


class Installed(Mmproxy):
    """The virtualenv's `mmproxy` command, in the gateway namespace."""

    def __init__(self, net: Net, command: Path, config_path: Path) -> None:
        cmd = net.gw.exec_args(str(command), "-c", str(config_path), "-v")
        self._spawn(net.gw, config_path, cmd, cwd="/")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv (no system site-packages) with mmproxy installed from the wheel
    built from the sdist built from a copy of the tree."""
    work = tmp_path_factory.mktemp("pip")
    tree = work / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    env = work / "venv"
    run(os.path.realpath(sys.executable), "-m", "venv", env)  # the interpreter, not .venv's
    pip: list[str | Path] = [env / "bin/python", "-m", "pip", "--disable-pip-version-check", "-q"]
    run(*pip, "install", "build")
    run(env / "bin/python", "-m", "build", "--sdist", "--outdir", work / "sdist", tree)
    (sdist,) = (work / "sdist").glob("mmproxy-*.tar.gz")
    run(*pip, "wheel", "--no-deps", "--wheel-dir", work / "wheels", sdist)
    (wheel,) = (work / "wheels").glob("mmproxy-*.whl")
    run(*pip, "install", wheel)
    yield env


def test_the_sdist_carries_the_c_source(venv: Path) -> None:
    (sdist,) = (venv.parent / "sdist").glob("mmproxy-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[-1] for name in tar.getnames()}
    assert {"setup.py", "pyproject.toml", "mmproxy/_splice.c"} <= names, sorted(names)


def test_the_wheel_is_a_platform_wheel_with_the_extension(venv: Path) -> None:
    (wheel,) = (venv.parent / "wheels").glob("mmproxy-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    assert "linux_" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as whl:
        assert [n for n in whl.namelist() if n.startswith("mmproxy/_splice.") and ".so" in n]


def test_the_installed_commands_work_outside_the_tree(venv: Path) -> None:
    python = venv / "bin/python"
    # Debian's site-packages are not seen, and mmproxy comes from the virtualenv.
    where = run(python, "-c", "import mmproxy.forwarder, sys; print(mmproxy.__file__, sys.path)",
                cwd=Path("/"))  # fmt: skip
    assert str(venv) in where.split()[0] and "/usr/lib/python3/dist-packages" not in where
    assert run(venv / "bin/mmproxy", "--version", cwd=Path("/")).strip() == "mmproxy 0.1.0"


def test_the_installed_mmproxy_relays_a_spoofed_connection(
    venv: Path, lo_net: Net, tmp_path: Path
) -> None:
    app = start_backend(lo_net.gw, "127.0.0.1")
    config = tmp_path / "pip.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **lo_net.config_keys(),
                "listen": ["127.0.0.1:2222"],
                "ipv4": app.address,
                "allowed_networks": ["127.0.0.0/8"],
                "mark": MARK,
                "table": TABLE,
            }
        )
    )
    proc = Installed(lo_net, venv / "bin/mmproxy", config)
    try:
        proc.wait_for("listening on")
        with lo_net.gw.connect(("127.0.0.1", 2222)) as sock:
            sock.sendall(encode_v1("TCP4", (CLIENT4, 40555), ("198.51.100.1", 2222)))
            assert sock.makefile("rb").readline() == f"{CLIENT4} 40555\n".encode()
    finally:
        proc.stop()
