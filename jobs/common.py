"""What every job's ``main`` shares: the ``--config PRESET key=value ...`` command line and
turning bad input into one clear line on stderr (exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from icm import storage
from icm.config import ConfigError, PipelineConfig, list_presets, load_config
from icm.errors import InputError
from icm.logs import quiet_known_noise, set_verbose, verbose
from icm.io import probe_writable


def parse_job_args(description: str, argv: Sequence[str] | None) -> PipelineConfig:
    """Parse ``--config NAME_OR_PATH [section.field=value ...]`` into a validated config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="demo",
                        help=f"preset {list_presets()} or a YAML path (it may `extends:` one)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every library's warnings and logs (also: ICM_LOG_LEVEL=DEBUG)")
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    quiet_known_noise()
    logging.basicConfig(level=logging.DEBUG if verbose() else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    return load_config(args.config, args.overrides)


def ensure_writable_root(config: PipelineConfig) -> Path:
    """Prove ``storage.root`` writable before any work starts (a URI: one small object written
    and deleted, after its local mirror); returns the local working root."""
    root = config.storage.path()
    field = "storage.local_mirror" if config.storage.is_remote else "storage.root"
    try:
        probe_writable(root)
    except OSError as err:
        raise ConfigError(f"{field} {str(root)!r} is not writable ({err.strerror}). "
                          f"Fix: set {field}=DIR to a writable directory.") from None
    if config.storage.is_remote:
        storage.probe_writable(config.storage.root)  # StorageError names storage.root and the fix
    return root


def user_errors_exit_2(main: Callable[..., int]) -> Callable[..., int]:
    """Report config/suite/model/adapter errors as ``error: ...`` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (InputError, FileNotFoundError) as err:  # every user error is an InputError
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper
