"""Atomic file writes.

Why: a run folder is read later by ``predict``/``test``; a crash or Ctrl-C in the middle of a
write must leave either the old file or the complete new one, never half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty JSON, atomically (NaN is written as null so other tools can read it)."""
    atomic_write_text(path, json.dumps(_nan_to_none(obj), indent=2) + "\n")


def atomic_write(path: str | os.PathLike, writer: Callable[[str], Any]) -> None:
    """Call ``writer(tmp_path)`` to produce the file, then rename it onto ``path``.

    The temp file keeps ``path``'s suffix so writers that infer a format from the name
    (PIL, safetensors) work. It is created with ``os.open(..., 0o666)``, so the kernel
    applies the umask exactly as for a file created by ``open`` (a run folder written by one
    account stays readable by the service that scores with it), without this module ever
    reading the umask (there is no getter: reading it means setting it, a process-wide
    change that races with other threads). The data is fsynced before the rename and the
    folder after it, so a power cut leaves the old file or the new one, not an empty one.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(p)
    try:
        writer(str(tmp))
        fsync_path(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def sha256_file(path: str | os.PathLike, digest: "hashlib._Hash | None" = None) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks; with ``digest``, the file is
    added to that running hash instead (and its digest so far returned)."""
    h = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def safe_name(name: str, empty: str = "_") -> str:
    """``name`` as one file-name component: letters, digits, ``-_.`` kept, anything else ``_``
    (``empty`` where nothing is left). The heat maps, reports and protocol folders use it."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or empty


def csv_cell(value: Any) -> Any:
    """One CSV cell of a results file: floats in full (``repr``, so a score reads back
    exactly), None as an empty cell. ``predictions.csv`` and ``scores.csv`` both use it."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file :func:`atomic_write` creates (left behind by a kill)."""
    return name.startswith(".") and _TEMP_MARK in name


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data to the disk (not just to the OS cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to the disk; a no-op where folders
    cannot be opened (Windows), which orders renames itself."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; nothing more can be done
        pass
    finally:
        os.close(fd)


_TEMP_MARK = ".tmp-"


def _create_temp(p: Path) -> Path:
    """A new, empty, uniquely named file beside ``p`` (mode 0666 less the umask)."""
    for _ in range(100):
        tmp = p.with_name(f".{p.stem}{_TEMP_MARK}{secrets.token_hex(6)}{p.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {p}")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
