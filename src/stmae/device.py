"""Device selection, mixed precision and graph tracing, shared by training and inference."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to torch.

    Asking for CUDA on a machine without it is an error rather than a silent CPU fallback,
    so timings and results are never attributed to the wrong device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores); a no-op on CPU, where fp32 is faster."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def tracing() -> bool:
    """Whether the code runs under ``torch.jit`` tracing or ONNX export, where shapes are
    symbolic and only plain tensor operations may run (no chunking, caches or layouts)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def tf32_products(enabled: bool) -> Iterator[None]:
    """CUDA float32 matrix products in TF32 inside the block (tensor cores; docs/research.md,
    "Figures behind the code"); the previous setting is restored after.
    The setting is process-wide while the block runs."""
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
