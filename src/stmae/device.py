"""Device selection and mixed precision, shared by training and inference."""

from __future__ import annotations

import contextlib

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
