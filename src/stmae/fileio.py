"""Atomic file writes.

Why: a run folder is read later by ``predict``/``test``; a crash or Ctrl-C in the middle of a
write must leave either the old file or the complete new one, never half a checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
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
    (PIL, safetensors) work. The result gets the permissions of a file created by ``open``
    (0666 less the umask), not the temp file's private 0600, so a run folder written by
    one account can be read by the service that scores with it.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}", dir=p.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
