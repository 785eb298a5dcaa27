"""Where a batch of 64 goes on a GPU: the pipeline's stages, and bank-search variants.

Why: at batch 64 the CUDA pipeline runs at about 2,400 images/s against a target of 3,000
(benchmarks/results/speed-cuda.json), and replaying it from a CUDA graph barely helps, so the
GPU itself is busy. This times each stage of :class:`stmae.pipeline.MapPipeline` on 64
resident images (events, median of repeats after warm-up), and the bank search in four ways on
the same real features, each with its largest error against a float64 search:

- ``float32``: :func:`stmae.model.memory.nearest_distances` as the pipeline runs it;
- ``tf32_product``, ``bf16_product``: the (queries x bank) product alone at lower precision
  (what a reduced-precision search would cost at least);
- ``bf16_top9_recheck``: bf16 distances, the 9 nearest candidates by them, their exact float32
  distances, the minimum; with how many queries a rounding bound cannot certify.

Run: ``python research/gpu_stages.py RUN_DIR --data DIR [--out FILE]`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stmae import load, provenance
from stmae.data import load_mvtec, resize_image, to_tensor_batch
from stmae.model import memory
from stmae.model.memory import nearest_distances

ROOT = Path(__file__).resolve().parents[1]


def cuda_ms(fn: Callable[[], Any], repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def bf16_top_recheck(rows: torch.Tensor, bank: torch.Tensor, k: int = 9, chunk: int = 16384) -> tuple[torch.Tensor, int]:
    """Distances by bf16 candidates and a float32 recheck; (distances, uncertified queries).

    The bank is centred first (smaller norms, smaller rounding). A query is certified when
    its exact minimum over the k - 1 best candidates is at most the k-th candidate's bf16
    distance minus the rounding bound u * (|q| + |b|max)^2 * 4 (u = 2^-8, a loose bound).
    """
    centre = bank.mean(dim=0, keepdim=True)
    b = bank - centre
    b_sq = (b * b).sum(dim=1)
    b16 = b.bfloat16()
    bmax = float(b.norm(dim=1).max())
    out, uncertified = [], 0
    for start in range(0, rows.shape[0], chunk):
        q = rows[start : start + chunk] - centre
        approx = b_sq.unsqueeze(0) - 2.0 * (q.bfloat16() @ b16.T).float()
        vals, idx = approx.topk(k, dim=1, largest=False)
        cand = b[idx[:, : k - 1]]
        exact = ((q.unsqueeze(1) - cand) ** 2).sum(dim=2).amin(dim=1)
        q_sq = (q * q).sum(dim=1)
        bound = 4.0 * 2.0**-8 * (q.norm(dim=1) + bmax) ** 2
        uncertified += int((exact > vals[:, k - 1] + q_sq - bound).sum())
        out.append(exact.clamp_min(0).sqrt())
    return torch.cat(out), uncertified


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "research" / "results" / "gpu_stages.json")
    args = p.parse_args(argv)
    started = time.time()
    det = load(args.run_dir, device="cuda")
    pipe = det.pipeline
    samples = load_mvtec(args.data).test
    size = det.config.features.image_size
    images = [resize_image(samples[i % len(samples)].load_image(), size) for i in range(args.batch)]
    x = to_tensor_batch(images).cuda()
    res: dict[str, Any] = {"batch": args.batch, "bank_rows": int(pipe.bank.shape[0])}
    with torch.inference_mode():
        feats = pipe.features(x)
        grid = pipe.grid_maps(feats)
        stages = {
            "total": cuda_ms(lambda: pipe(x)),
            "features": cuda_ms(lambda: pipe.features(x)),
            "backbone_only": cuda_ms(lambda: pipe.extractor.backbone(x)),
            "residual": cuda_ms(lambda: pipe.residual(feats)),
            "distances": cuda_ms(lambda: pipe.distances(feats)),
            "postprocess": cuda_ms(lambda: pipe.postprocess(grid)),
        }
        with torch.autocast("cuda", dtype=torch.bfloat16):
            stages["features_bf16_autocast"] = cuda_ms(lambda: pipe.features(x))
        xc = x.contiguous(memory_format=torch.channels_last)
        stages["features_channels_last"] = cuda_ms(lambda: pipe.features(xc))
        stages["backbone_only_channels_last"] = cuda_ms(lambda: pipe.extractor.backbone(xc))
        pipe.extractor.to(memory_format=torch.channels_last)
        stages["features_channels_last_weights_too"] = cuda_ms(lambda: pipe.features(xc))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            stages["features_channels_last_weights_too_bf16"] = cuda_ms(lambda: pipe.features(xc))
        stages["features_channels_last_max_abs_diff"] = float((pipe.features(xc) - feats).abs().max())
        res["stages_ms"] = stages
        n, c, h, w = feats.shape
        rows = feats.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
        bank, bank_sq = pipe.bank, pipe.bank_sq
        truth = torch.cat([torch.cdist(rows[i : i + 8192].double(), bank.double()).amin(dim=1) for i in range(0, len(rows), 8192)])
        search: dict[str, Any] = {"queries": int(rows.shape[0]), "channels": int(c)}
        search["float32_ms"] = cuda_ms(lambda: nearest_distances(rows, bank, bank_sq))
        search["float32_max_abs_err"] = float((nearest_distances(rows, bank, bank_sq).double() - truth).abs().max())
        b16, r16 = bank.bfloat16(), rows.bfloat16()
        search["bf16_product_ms"] = cuda_ms(lambda: r16 @ b16.T)
        torch.backends.cuda.matmul.allow_tf32 = True
        search["tf32_product_ms"] = cuda_ms(lambda: rows @ bank.T)
        search["tf32_search_ms"] = cuda_ms(lambda: nearest_distances(rows, bank, bank_sq))
        search["tf32_search_max_abs_err"] = float((nearest_distances(rows, bank, bank_sq).double() - truth).abs().max())
        torch.backends.cuda.matmul.allow_tf32 = False
        blocks = {}
        for shift in (20, 22, 23, 24, 25, 27):
            memory.DISTANCE_BLOCK_GPU = 1 << shift
            blocks[f"float32_block_2^{shift}_ms"] = cuda_ms(lambda: nearest_distances(rows, bank, bank_sq))
            torch.backends.cuda.matmul.allow_tf32 = True
            blocks[f"tf32_block_2^{shift}_ms"] = cuda_ms(lambda: nearest_distances(rows, bank, bank_sq))
            torch.backends.cuda.matmul.allow_tf32 = False
        memory.DISTANCE_BLOCK_GPU = 1 << 27
        search["blocks"] = blocks
        search["bf16_top9_recheck_ms"] = cuda_ms(lambda: bf16_top_recheck(rows, bank))
        d, unc = bf16_top_recheck(rows, bank)
        search["bf16_top9_recheck_max_abs_err"] = float((d.double() - truth).abs().max())
        search["bf16_top9_recheck_uncertified"] = unc
        search["nearest_distance_median"] = float(truth.median())
        res["search"] = search
    res["provenance"] = provenance.collect("cuda", started=started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "provenance"}, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
