"""The map pipeline captured into CUDA graphs: one replayed launch per batch instead of hundreds.

Why: on a GPU, scoring one image is a few hundred small kernels (backbone, transformer, bank
search, post-processing). Launching them one by one from Python takes longer than running
them, so batch-1 latency is bound by the launches, not by the GPU. A CUDA graph records the
launches once and replays them with one call.

A graph is fixed to its shapes and its memory, so:

- one graph is captured per batch size (on first use, or up front with ``batch_sizes``);
- the caller's batch is copied into the graph's own input buffer before each replay;
- the outputs are copied out, because the next replay overwrites the graph's buffers.

The graph runs exactly the kernels of :class:`stmae.pipeline.MapPipeline` (the same module,
same weights, same settings), so its maps equal the eager pipeline's up to the run-to-run
rounding of the GPU kernels; ``benchmarks/speed.py`` records the difference.

Usage::

    det = stmae.load("runs/x", device="cuda")
    graphed = GraphedPipeline(det.pipeline, batch_sizes=(1, 64))
    maps, scores = graphed(images)      # (N, 3, S, S) in [0, 1] on the GPU
"""

from __future__ import annotations

from typing import Iterable

import torch

from stmae.pipeline import MapPipeline


class GraphedPipeline:
    """A :class:`~stmae.pipeline.MapPipeline` on a CUDA device, replayed from CUDA graphs.

    Args:
        pipeline: the pipeline to capture; it must be on a CUDA device. Change no setting
            of it afterwards: the graphs keep the kernels it had when captured.
        batch_sizes: batch sizes captured now; any other is captured on first use.
        warmup: eager runs before each capture (lazy initialisation and kernel choice must
            happen outside the graph).
    """

    def __init__(self, pipeline: MapPipeline, batch_sizes: Iterable[int] = (1,), warmup: int = 3) -> None:
        device = pipeline.feature_stats.mean.device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a pipeline on a CUDA device; this one is on {device}")
        self.pipeline = pipeline
        self.device = device
        self.warmup = int(warmup)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for batch in batch_sizes:
            self.capture(int(batch))

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes captured so far."""
        return sorted(self._graphs)

    def capture(self, batch: int) -> None:
        """Capture the pipeline for ``batch`` images (again, if it was captured before)."""
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        size = self.pipeline.image_size
        gen = torch.Generator(device=self.device).manual_seed(0)
        static = torch.rand(batch, 3, size, size, device=self.device, generator=gen)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.inference_mode():
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.pipeline(static)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                maps, scores = self.pipeline(static)
        self._graphs[batch] = (graph, static, maps, scores)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, S, S) in [0, 1] -> (maps (N, S, S), scores (N,)), on the pipeline's GPU."""
        size = self.pipeline.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images of shape (N, 3, {size}, {size}), got {tuple(images.shape)}")
        n = int(images.shape[0])
        if n not in self._graphs:
            self.capture(n)
        graph, static, maps, scores = self._graphs[n]
        with torch.inference_mode():
            static.copy_(images, non_blocking=True)
            graph.replay()
            return maps.clone(), scores.clone()


__all__ = ["GraphedPipeline"]
