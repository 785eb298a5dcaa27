"""Where a result came from: command, commit, device, versions, seconds.

Why: a figure is only worth quoting if one command at one commit reproduces it. Every
results file the project writes (benchmarks, research scripts, run folders) embeds
:func:`collect`'s dict, so a reader can tell which code, machine and library versions made
it (the benchmark scripts also refuse to merge parts made by other code).

:func:`code_revision` identifies the *code* without git: a digest of the package's own
source files. It is what resumable fits fingerprint, so a state saved by other code is
refused even from an installed (non-git) copy.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PACKAGE_DIR = Path(__file__).resolve().parent

#: Distributions whose versions a results file records when they are installed.
VERSIONED = ("stmae", "torch", "numpy", "scipy", "pillow", "onnx", "onnxruntime", "openvino", "faiss-cpu", "fastapi")


@lru_cache(maxsize=1)
def code_revision() -> str:
    """SHA-256 (first 16 hex digits) of every ``.py`` file of the installed package, in path order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _git(repo: Path, *args: str) -> str | None:
    """Output of a read-only git command, or None (no git, not a repository).

    ``GIT_OPTIONAL_LOCKS=0`` keeps ``git status`` from refreshing (writing) the index.
    """
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


#: A copy of the tree sent to another machine may come without git, or with a ``.git`` that
#: is not the one the copy was made from (seen on a lent GPU machine). The commit the copy was
#: made from is then given in this variable; it wins over git, and the results file says so.
COMMIT_VARIABLE = "STMAE_SOURCE_COMMIT"


def git_state(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """``commit`` (full hash or None), ``dirty`` and ``modified`` (tracked files with uncommitted changes).

    With :data:`COMMIT_VARIABLE` set, ``commit`` is its value, ``commit_source`` names it and
    ``dirty`` is None (unknown: ``code_revision``, the digest of the package's source, is the check).
    """
    if os.environ.get(COMMIT_VARIABLE, "").strip():
        return {"commit": os.environ[COMMIT_VARIABLE].strip(), "commit_source": COMMIT_VARIABLE, "dirty": None,
                "modified": []}
    root = Path(repo) if repo is not None else PACKAGE_DIR
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    modified = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": commit, "dirty": bool(modified), "modified": modified}


def versions(names: Iterable[str] = VERSIONED) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones left out), plus Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cpu_name() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``), else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str | None = None) -> dict[str, Any]:
    """What ran it: CPU model, core count, torch threads and, for a CUDA device, the GPU."""
    info: dict[str, Any] = {
        "device": device or "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if device and str(device).startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def command_line(argv: Iterable[str] | None = None) -> str:
    """The command as a user would type it again (``python path/script.py --flag ...``)."""
    args = list(sys.argv if argv is None else argv)
    if args and args[0].endswith(".py"):
        args = ["python", os.path.relpath(args[0]) if os.path.isabs(args[0]) else args[0], *args[1:]]
    elif args:
        args[0] = Path(args[0]).name
    return shlex.join(args)


def collect(
    device: str | None = None,
    *,
    command: str | None = None,
    repo: str | os.PathLike | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """The provenance block for a results file; pass ``started`` (``time.time()``) to record seconds."""
    prov: dict[str, Any] = {
        "command": command if command is not None else command_line(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **git_state(repo),
        "code_revision": code_revision(),
        "device": device_info(device),
        "versions": versions(),
    }
    if started is not None:
        prov["seconds"] = round(time.time() - started, 2)
    return prov


__all__ = [
    "code_revision", "collect", "command_line", "cpu_name", "device_info", "git_state", "versions",
]
