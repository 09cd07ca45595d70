"""The core library stays Ray-free, so it is testable in one process in seconds."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import icm


def _icm_modules() -> list[str]:
    """Every module of the library, sub-packages (icm.eval, icm.generator) included."""
    return sorted(m.name for m in pkgutil.walk_packages(icm.__path__, prefix="icm.")
                  if m.name != "icm.__main__")


def test_importing_every_icm_module_leaves_ray_out():
    modules = _icm_modules()
    assert "icm.tasks" in modules and "icm.generator.hyper" in modules and "icm.eval.stats" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    if name != 'icm.__main__': importlib.import_module(name)\n"
            "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not leaked, leaked\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_user_error_of_the_library_is_an_input_error():
    """Commands catch InputError alone: a module's own error class must derive from it."""
    import importlib
    import inspect

    from icm.errors import InputError

    errors = {}
    for name in _icm_modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, Exception):
                errors[f"{name}.{cls_name}"] = cls
    assert len(errors) >= 15, sorted(errors)
    assert [n for n, cls in errors.items() if not issubclass(cls, InputError)] == []



def test_the_library_never_imports_the_layers_above_it():
    """icm/ is imported by jobs/ and serve_apps/, never the other way round (the command line
    and the presets live in jobs/)."""
    import re
    from pathlib import Path

    root = Path(icm.__file__).parent
    imports = re.compile(r"^\s*(from|import)\s+(jobs|serve_apps)\b|import_module\(\s*[\"'](jobs|serve_apps)",
                         re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if imports.search(p.read_text())]
    assert offenders == [], offenders
