"""The allocator tuning (stmae.allocator): what it changes, when it stays off, and that the
command applies it. Each check runs in a fresh process: the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only"
)

#: In a fresh process: tune or not, then hold a 40 MB tensor and free it, and read glibc's
#: statistics (mallinfo2) each time: bytes in mmapped blocks while it lives, free bytes the
#: heap keeps after. glibc's default maps a block that large on its own and unmaps it on free
#: (its dynamic mmap threshold stops at 32 MB), so the next one faults in fresh pages.
PROBE = """
import ctypes, json, sys
from stmae.allocator import tune_allocator
state = tune_allocator() if sys.argv[1] == "tune" else None
import torch
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
t = torch.empty(10_000_000)
t.fill_(1.0)
mapped = libc.mallinfo2().hblkhd
del t
kept = libc.mallinfo2().fordblks
print(json.dumps({"mapped": mapped, "kept": kept, "state": state.as_dict() if state else None}))
"""
BLOCK = 40_000_000


def probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "STMAE_MALLOC_TUNING"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environ, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuning_keeps_large_blocks_in_the_heap():
    plain, tuned = probe("plain"), probe("tune")
    assert plain["mapped"] >= BLOCK and plain["kept"] < BLOCK  # mapped alone, unmapped on free
    assert tuned["mapped"] < BLOCK <= tuned["kept"]  # from the heap, and kept there for the next call
    assert tuned["state"] == {
        "applied": True, "reason": "glibc thresholds raised", "mmap_threshold": 64 << 20, "trim_threshold": 128 << 20,
    }


@glibc
def test_switch_and_glibc_variables_leave_it_off():
    off = probe("tune", STMAE_MALLOC_TUNING="0")
    assert off["state"]["applied"] is False and "STMAE_MALLOC_TUNING=0" in off["state"]["reason"]
    assert off["mapped"] >= BLOCK and off["kept"] < BLOCK
    given = probe("tune", MALLOC_TRIM_THRESHOLD_="1000000")
    assert given["state"]["applied"] is False and "MALLOC_TRIM_THRESHOLD_" in given["state"]["reason"]


@glibc
def test_the_command_tunes_its_process():
    code = (
        "import sys\nfrom stmae import cli, allocator\nsys.argv = ['stmae', 'demo', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\nprint(allocator._state.applied if allocator._state else None)"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "STMAE_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
