"""CUDA graphs of the map pipeline (stmae_research.cuda_graphs) and the pipeline on a GPU.

The GPU tests run where CUDA is (a lent GPU machine: ``bash benchmarks/device_speed.sh``)
and are skipped elsewhere; the refusal of a CPU pipeline runs everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stmae_research import scoring
import stmae
from stmae_research.cuda_graphs import GraphedPipeline
from stmae.data import to_tensor_batch

from tests.conftest import make_tiny_category, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda")
    data = make_tiny_category(root / "tiny")
    return stmae.fit(data, root / "run", tiny_config(**{"infer.distance_weight": 0.5}), quiet=True).run_dir


def _test_images(data: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The tiny category's 6 test images at 64 px and their labels (good first, then the red spots)."""
    from stmae.data import load_mvtec, resize_image

    samples = load_mvtec(data).test
    images = to_tensor_batch([resize_image(s.load_image(), 64) for s in samples])
    return images, np.array([s.label for s in samples])


def test_graphed_pipeline_refuses_a_cpu_pipeline(run_dir: Path) -> None:
    det = stmae.load(run_dir, device="cpu")
    with pytest.raises(ValueError, match="CUDA device; this one is on cpu"):
        GraphedPipeline(det.pipeline)


@needs_cuda
def test_pipeline_on_cuda_matches_cpu_and_detects(run_dir: Path) -> None:
    images, labels = _test_images(run_dir.parent / "tiny")
    cpu_maps, cpu_scores = scoring.score_tensor(stmae.load(run_dir, device="cpu"), images)
    gpu = stmae.load(run_dir, device="cuda")
    maps, scores = scoring.score_tensor(gpu, images)
    # The transformer runs in bf16 on CUDA: maps agree with the CPU's up to that rounding
    # (0.14 of the threshold at most when measured: 0.16 on Magnetic Tile, benchmarks/results/speed-cuda.json).
    t = gpu.threshold
    assert float((maps - cpu_maps).abs().max()) < 0.3 * t
    assert ((scores > t) == (cpu_scores > t)).all()
    assert scores[labels == 1].min() > scores[labels == 0].max()  # the red spots outscore every good image


@needs_cuda
def test_graph_replay_equals_eager_for_each_new_input(run_dir: Path) -> None:
    images, labels = _test_images(run_dir.parent / "tiny")
    det = stmae.load(run_dir, device="cuda")
    pipe = det.pipeline
    graphed = GraphedPipeline(pipe, batch_sizes=(1,))
    x = images.cuda()
    with torch.inference_mode():
        eager_maps, eager_scores = pipe(x)
    maps, scores = graphed(x)  # batch 6: captured on first use
    assert graphed.batch_sizes == [1, 6]
    assert torch.allclose(maps, eager_maps, atol=1e-4 * det.threshold, rtol=0)
    assert torch.allclose(scores, eager_scores, atol=1e-4 * det.threshold, rtol=0)
    # One image at a time through the batch-1 graph: each replay sees its own input. (Against
    # eager batch-1 runs: another batch size picks other bf16 kernels, a few % of the threshold away.)
    singles = torch.cat([graphed(x[i : i + 1])[1] for i in range(len(x))])
    with torch.inference_mode():
        eager_singles = torch.cat([pipe(x[i : i + 1])[1] for i in range(len(x))])
    assert torch.allclose(singles, eager_singles, atol=1e-4 * det.threshold, rtol=0)
    assert singles[torch.from_numpy(labels == 1).cuda()].min() > singles[torch.from_numpy(labels == 0).cuda()].max()
    with pytest.raises(ValueError, match="expected images of shape"):
        graphed(x[:, :, :32])


def test_tf32_products_restore_the_setting_even_on_error() -> None:
    from stmae.device import tf32_products

    before = torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(RuntimeError):
        with tf32_products(True):
            assert torch.backends.cuda.matmul.allow_tf32 is True
            raise RuntimeError("boom")
    assert torch.backends.cuda.matmul.allow_tf32 is before
    with tf32_products(False):
        assert torch.backends.cuda.matmul.allow_tf32 is before


@needs_cuda
def test_tf32_bank_search_stays_near_the_float32_one() -> None:
    from stmae.model.memory import nearest_distances

    gen = torch.Generator(device="cuda").manual_seed(0)
    bank = torch.randn(5000, 176, device="cuda", generator=gen)
    queries = bank[:2000] + 0.3 * torch.randn(2000, 176, device="cuda", generator=gen)
    exact = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    fast = nearest_distances(queries, bank, tf32=True).double()
    assert float((fast - exact).abs().max()) < 2e-2 * float(exact.median())
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
