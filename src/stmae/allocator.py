"""Process-wide tuning of glibc's memory allocator for scoring batches on a CPU.

Why: PyTorch takes every CPU tensor from ``malloc``. glibc serves a block above its *mmap
threshold* (dynamic, never above 32 MB) with fresh pages from the kernel and unmaps them on
``free``, and it hands free memory at the top of its heap back to the kernel above its *trim
threshold*. Scoring a batch of 32 images at 256 px allocates tensors of 25-45 MB in every
stage (a 4-image backbone chunk, the transformer's hidden layer over 64 sequences), so each
call faulted in thousands of fresh pages per image, and a page fault costs as much as the
arithmetic on it. Keeping blocks below 64 MB in the heap, and up to 128 MB of freed memory
with the process, removes nearly all of them: batch-32 scoring became faster and batch-1
latency, which faults nothing, stayed as it was (``benchmarks/allocator.py``, its results in
``benchmarks/results/allocator-cpu.json``). Maps do not change: only where memory comes
from does.

The cost is memory the process keeps: up to :data:`TRIM_THRESHOLD` of freed heap is not
returned to the kernel, so resident memory stays near its peak. Because the setting holds for
the whole process, the library never applies it on its own: the ``stmae`` command does at
start (every verb, the service included), and a program that embeds stmae may call
:func:`tune_allocator` once. ``STMAE_MALLOC_TUNING=0`` turns it off, and glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables, when set, are left to rule.

No torch import here: the runtime of an exported model uses the same command.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass

#: Blocks below this come from the heap and are reused, not mapped fresh per call.
MMAP_THRESHOLD = 64 << 20
#: Freed memory at the top of the heap kept by the process before it goes back to the kernel.
TRIM_THRESHOLD = 128 << 20
#: mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The environment switch: ``0`` (or ``off``, ``false``, ``no``) leaves the allocator as it is.
ENV_SWITCH = "STMAE_MALLOC_TUNING"
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@dataclass(frozen=True)
class AllocatorTuning:
    """What :func:`tune_allocator` did: ``applied`` and, either way, why."""

    applied: bool
    reason: str
    mmap_threshold: int | None = None
    trim_threshold: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "reason": self.reason,
            "mmap_threshold": self.mmap_threshold,
            "trim_threshold": self.trim_threshold,
        }


_state: AllocatorTuning | None = None


def tune_allocator() -> AllocatorTuning:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls return the
    first answer). A no-op, with the reason, off glibc, when ``STMAE_MALLOC_TUNING=0``, or
    when the user set glibc's variables already."""
    global _state
    if _state is None:
        _state = _tune()
    return _state


def _tune() -> AllocatorTuning:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return AllocatorTuning(False, f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}")
    given = [name for name in _GLIBC_VARIABLES if name in os.environ]
    if given:
        return AllocatorTuning(False, f"left to the environment's {', '.join(given)}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return AllocatorTuning(False, "not glibc: its allocator is left as it is")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:  # pragma: no cover - glibc always has mallopt
        return AllocatorTuning(False, f"mallopt unavailable: {exc}")
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return AllocatorTuning(False, "mallopt refused the thresholds")
    return AllocatorTuning(True, "glibc thresholds raised", MMAP_THRESHOLD, TRIM_THRESHOLD)


__all__ = ["AllocatorTuning", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "ENV_SWITCH", "tune_allocator"]
