"""A copy of the code under test that another user can run, wherever the checkout lives.

Tests that run mmproxy as nobody must not run it from the checkout: cloned under /root
(mode 0700) or any other directory only root enters, nobody reaches neither the code nor
the virtualenv's packages. copy_for_others() puts mmproxy (with its built C part) and the
packages the virtualenv adds (pytricia) in a world-readable temporary directory; run
Debian's interpreter on it with PYTHONPATH and that directory as the working directory."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Imported by mmproxy at run time and possibly installed in the virtualenv, not Debian.
RUNTIME_MODULES = ("mmproxy", "pytricia", "yaml", "systemd", "sdnotify")


@dataclass(frozen=True)
class Runnable:
    python: str  # the interpreter itself, not the virtualenv's link to it
    path: Path  # PYTHONPATH and working directory

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env["PYTHONPATH"] = str(self.path)
        return env


def _origin(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def _copy_module(module: str, dest: Path) -> None:
    origin = _origin(module)
    if origin is None or origin.is_relative_to("/usr"):
        return  # not installed, or Debian's: readable by everyone
    if origin.name == "__init__.py":
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(origin.parent, dest / origin.parent.name, ignore=ignore)
    else:
        shutil.copy(origin, dest / origin.name)


@contextlib.contextmanager
def copy_for_others() -> Iterator[Runnable]:
    """A world-readable copy of mmproxy and its non-Debian packages, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mmproxy-code-") as name:
        dest = Path(name)
        for module in RUNTIME_MODULES:
            _copy_module(module, dest)
        for path in [dest, *dest.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield Runnable(os.path.realpath(sys.executable), dest)
