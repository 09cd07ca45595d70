"""Atomic file writes and content hashes.

Every long stage writes through these helpers so that a kill at any moment leaves either
the old file or the new one, never half of one: data goes to a temporary sibling first and
is renamed into place (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> Path:
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return write_text_atomic(path, lines)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place on success.

    An existing ``final`` is replaced only after the new one is complete; on an exception
    the half-built directory is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def probe_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and prove a file can be written in it; raises ``OSError`` if not."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-probe-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
    return folder


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$ICM_CACHE_DIR``, else the platform's user cache directory for icm-ray
    (``$XDG_CACHE_HOME/icm-ray`` or ``~/.cache/icm-ray`` on Linux)."""
    if os.environ.get("ICM_CACHE_DIR"):
        return Path(os.environ["ICM_CACHE_DIR"]).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("icm-ray", appauthor=False)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """An inter-process lock on ``path`` (its folder is created); yields whether it was taken
    (always True when ``blocking``; False at once when another process holds it)."""
    from filelock import FileLock, Timeout

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=-1 if blocking else 0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def fingerprint_matches(marker: str | os.PathLike, fingerprint: str) -> bool:
    """Whether the JSON file ``marker`` exists and records ``fingerprint``: finished work that
    a rerun with the same inputs may skip."""
    path = Path(marker)
    return path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a server this process starts next)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
