"""The core library stays Ray-free, so it is testable in one process in seconds."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import icm


def test_importing_every_icm_module_leaves_ray_out():
    modules = sorted(f"icm.{m.name}" for m in pkgutil.iter_modules(icm.__path__))
    assert "icm.tasks" in modules and "icm.models" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    if name != 'icm.__main__': importlib.import_module(name)\n"
            "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not leaked, leaked\n")
    subprocess.run([sys.executable, "-c", code], check=True)
