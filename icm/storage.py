"""Reading and writing under a storage location: a local path or any URI pyarrow.fs understands.

``storage.root`` may be a directory (``runs/a``) or a URI (``s3://bucket/runs/a``,
``gs://...``, ``file:///abs/dir``). Every helper here takes either and goes through
`pyarrow.fs`, so a ``file://`` URI exercises the very code path an object store takes.

Atomicity: on an object store one PUT is atomic per object (a reader sees the old object or the
new one); on a local file system a file is written to a temporary sibling and renamed. A
directory is never atomic remotely, so `push_dir` uploads its commit marker (``stage.json``,
``snapshot.json``, ...) LAST: a reader that trusts only directories holding their marker never
sees a half-uploaded one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icm.errors import InputError
from icm.io import write_bytes_atomic

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# pyarrow is imported where used: icm.config imports this module and stays light.
_ROOTS: dict[str, tuple[pafs.FileSystem, str]] = {}  # resolved URI -> (filesystem, its path)


class StorageError(InputError):
    """``storage.root`` cannot be opened or written; the message says how to fix it."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def _split(uri: str) -> tuple[str, str]:
    """``s3://b/x/?region=r`` -> (``s3://b/x``, ``?region=r``): options stay at the end."""
    base, sep, query = uri.partition("?")
    return base.rstrip("/"), sep + query


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location``/``parts`` for a local path or a URI (URI options stay at the end)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    base, query = _split(str(location))
    return "/".join([base, *(str(p).strip("/") for p in parts if str(p))]) + query


def default_mirror(uri: str) -> Path:
    """The local working copy of a URI root: ``<cache>/storage-mirrors/<hash of the URI>``.

    The cache is the model cache's default (`icm.io.default_cache_dir`).
    """
    from icm.io import default_cache_dir

    return default_cache_dir() / "storage-mirrors" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of ``location``; URIs under an already resolved one reuse
    its filesystem (``from_uri`` on s3:// asks the bucket's region over the network).

    Raises:
        StorageError: pyarrow has no filesystem for the URI, or cannot reach it.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())
    uri = str(location)
    base, query = _split(uri)
    for root, (fs, path) in _ROOTS.items():
        root_base, root_query = _split(root)
        if query == root_query and (base == root_base or base.startswith(root_base + "/")):
            return fs, path.rstrip("/") + base[len(root_base):]
    try:
        _ROOTS[uri] = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise StorageError(
            f"storage.root {uri!r}: pyarrow cannot open it ({err}). Fix: use a local directory or "
            "a URI pyarrow.fs supports (s3://bucket/dir, gs://bucket/dir, file:///abs/dir), with "
            "credentials set up for it (AWS_* / GOOGLE_APPLICATION_CREDENTIALS / instance role); "
            "a pyarrow without S3/GCS support needs `pip install -U pyarrow`.") from None
    return _ROOTS[uri]


def _is_local(fs: pafs.FileSystem) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def _info(location: str | os.PathLike) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = resolve(location)
    return fs, path, fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location)[2].type != pafs.FileType.NotFound


def read_bytes(location: str | os.PathLike) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(location: str | os.PathLike) -> Any | None:
    """The parsed JSON object, or None when it is missing or not JSON (a partial local file)."""
    data = read_bytes(location)
    try:
        return None if data is None else json.loads(data)
    except json.JSONDecodeError:
        return None


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write one object/file so that readers see the old one or the whole new one."""
    fs, path = resolve(location)
    if _is_local(fs):
        write_bytes_atomic(path, data)
        return
    with fs.open_output_stream(path) as stream:  # the object appears when the upload completes
        stream.write(data)


def write_json(location: str | os.PathLike, obj: Any) -> None:
    write_bytes(location, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def delete(location: str | os.PathLike) -> None:
    """Remove a file or a whole directory; nothing happens when it does not exist."""
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(location: str | os.PathLike) -> dict[str, int]:
    """Every file under ``location`` (recursive): relative path -> size in bytes; {} if none."""
    import pyarrow.fs as pafs

    fs, path, info = _info(location)
    if info.type != pafs.FileType.Directory:
        return {}
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return {f.path[len(prefix):]: f.size for f in found if f.type == pafs.FileType.File}


def copy_file(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy one file between any two locations; the destination appears whole or not at all."""
    import pyarrow.fs as pafs

    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    if not _is_local(dst_fs):
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(dst).name}.", suffix=".tmp", dir=Path(dst).parent)
    os.close(fd)
    try:
        pafs.copy_files(src, tmp, source_filesystem=src_fs, destination_filesystem=dst_fs)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ordered(files: Iterable[str], skip: Sequence[str], last: Sequence[str]) -> list[str]:
    """Files to copy, commit markers (``last``, by base name) at the end; hidden files (another
    writer's temporaries, ``.x.partial`` staging dirs) and top-level ``skip`` folders left out."""
    kept = [f for f in sorted(files)
            if not any(part.startswith(".") for part in f.split("/")) and f.split("/")[0] not in skip]
    rank = {name: i for i, name in enumerate(last)}
    return sorted(kept, key=lambda f: rank.get(f.rsplit("/", 1)[-1], -1))  # stable: others first


def push_dir(local_dir: str | os.PathLike, destination: str, *, skip: Sequence[str] = (),
             last: Sequence[str] = ()) -> int:
    """Upload every file of ``local_dir`` under ``destination``, the ``last`` names after all
    others (so a killed push never leaves the commit marker). Returns the number of files."""
    local_dir = Path(local_dir)
    files = _ordered((p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()),
                     skip, last)
    for name in files:
        copy_file(local_dir / name, join(destination, name))
    return len(files)


def pull_dir(source: str, local_dir: str | os.PathLike, *, skip: Sequence[str] = (),
             last: Sequence[str] = (), keep_same_size: bool = False) -> int:
    """Download every file under ``source`` into ``local_dir`` (merging), ``last`` names last.
    ``keep_same_size`` keeps local files of the remote's size (write-once files such as
    snapshots). Returns the number of files downloaded."""
    local_dir = Path(local_dir)
    remote = list_files(source)
    count = 0
    for name in _ordered(remote, skip, last):
        target = local_dir / name
        if keep_same_size and target.is_file() and target.stat().st_size == remote[name]:
            continue
        copy_file(join(source, name), target)
        count += 1
    return count


def probe_writable(location: str) -> None:
    """Prove ``location`` (a URI) takes a write and a delete, before any work starts.

    Raises:
        StorageError: naming ``storage.root`` and what to check.
    """
    import pyarrow as pa

    resolve(location)  # an unknown scheme or unreachable store is named as the root itself
    probe = join(location, f".write-probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except StorageError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"storage.root {location!r} is not writable ({err}). Fix: check the "
                           "bucket exists and the credentials may write to it, or set "
                           "storage.root to another location.") from None

