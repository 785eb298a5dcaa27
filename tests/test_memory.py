"""The memory of good patches (``infer.distance_weight``): bank, scaling, blend, run folders, presets."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from stmae.pipeline import blend, blend_scales
import torch
import yaml

import stmae
from stmae.checkpoint import CheckpointError, load_run
from stmae.config import Config, ConfigError, preset
from stmae.model import PatchMemory
from stmae.model import memory as memory_module
from stmae.model.memory import patch_rows

from .conftest import load_benchmark, tiny_config


def test_patch_rows_are_image_major_then_row_major():
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    rows = patch_rows(feats)
    assert rows.shape == (8, 3)
    assert rows[5].tolist() == feats[1, :, 0, 1].tolist()  # image 1, grid row 0, column 1


def test_bank_is_a_coreset_of_the_training_patches_and_banked_patches_are_at_distance_zero():
    torch.manual_seed(0)
    feats = torch.randn(3, 5, 4, 4)
    memory = PatchMemory.fit(feats, 0.25, seed=1)
    assert memory.bank.shape == (12, 5)  # int(0.25 * 48)
    rows = patch_rows(feats)
    assert all(any(torch.equal(b, r) for r in rows) for b in memory.bank)
    full = PatchMemory.fit(feats, 1.0)
    assert torch.all(full.distances(feats) < 1e-2)  # cdist via matrix products: ~1e-3 rounding
    far = memory.distances(feats + 100.0)
    assert far.shape == (3, 4, 4) and torch.all(far > 50)
    with pytest.raises(ValueError, match="coreset ratio"):
        PatchMemory.fit(feats, 0.0)


def _exact_nearest(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return torch.cdist(queries.double(), bank.double()).amin(dim=1).float()


def test_bf16_bank_search_returns_the_exact_nearest_distance():
    """BankSearch rules rows out in bf16 and measures the rest in float32: its answer is the
    float64 nearest distance to float32 rounding, on clustered data full of near-ties (rows a
    bf16 product cannot tell apart), duplicates, queries on bank rows and far-away queries."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 48, generator=gen)
    bank = centres[torch.randint(20, (3000,), generator=gen)] + torch.randn(3000, 48, generator=gen)
    bank[1500:1600] = bank[:100]  # duplicates in other chunks
    bank[1600:1700] = bank[100:200] + 1e-3 * torch.randn(100, 48, generator=gen)  # near-ties below bf16 resolution
    queries = torch.cat([
        centres[torch.randint(20, (900,), generator=gen)] + torch.randn(900, 48, generator=gen),
        bank[:50],  # at distance 0
        bank[100:150] + 5e-4 * torch.randn(50, 48, generator=gen),  # between two near-tied rows
    ])
    search = memory_module.BankSearch(bank, chunk=64)
    got = search(queries)
    assert search._misses == 0 and not search.gave_up  # bf16 ruled rows out: no float32 fallback
    expected = _exact_nearest(queries, bank)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(got[900:950].max()) == 0.0  # exactly: |q - b|^2 of equal rows, not an expanded product
    # Blocks of queries (a small SEARCH_BLOCK) and a bank that is not a multiple of the chunk.
    odd = memory_module.BankSearch(bank[:2999], chunk=100)
    torch.testing.assert_close(odd(queries), _exact_nearest(queries, bank[:2999]), rtol=1e-5, atol=1e-4)


def test_bf16_bank_search_turns_to_float32_where_bf16_cannot_rule_rows_out(monkeypatch):
    """Tight clusters in many dimensions put hundreds of rows within bf16's error of the
    nearest: such blocks are searched in float32, and after two in a row the search stays there."""
    gen = torch.Generator().manual_seed(1)
    centres = 2.0 * torch.randn(8, 176, generator=gen)
    bank = centres[torch.randint(8, (3000,), generator=gen)] + 0.5 * torch.randn(3000, 176, generator=gen)
    queries = centres[torch.randint(8, (256,), generator=gen)] + 0.5 * torch.randn(256, 176, generator=gen)
    monkeypatch.setattr(memory_module, "SEARCH_BLOCK", 64 * 3000)  # blocks of 64 queries
    search = memory_module.BankSearch(bank)
    assert search._block(queries[:64]) is None  # too many rows stay in
    got = search(queries)
    assert search.gave_up
    torch.testing.assert_close(got, _exact_nearest(queries, bank), rtol=1e-5, atol=1e-4)


def test_bf16_bank_search_falls_back_for_non_finite_queries_and_is_used_only_where_it_pays(monkeypatch):
    bank = torch.randn(300, 8)
    queries = torch.randn(10, 8)
    queries[3, 2] = float("nan")
    got = memory_module.BankSearch(bank)(queries)
    assert torch.isnan(got[3]) and torch.allclose(got[:3], _exact_nearest(queries[:3], bank), atol=1e-4)
    monkeypatch.setattr(memory_module, "bf16_matmul_is_fast", lambda: True)
    assert memory_module.bank_search(torch.randn(100, 8)) is None  # below SEARCH_MIN_BANK
    big = torch.randn(memory_module.SEARCH_MIN_BANK, 8)
    search = memory_module.bank_search(big)
    assert search is not None
    torch.testing.assert_close(search(queries[4:]), _exact_nearest(queries[4:], big), rtol=1e-5, atol=1e-5)
    # A memory builds its search once and reuses it chunk after chunk, until its bank changes.
    memory = PatchMemory(big)
    feats = queries[4:].T.reshape(1, 8, 2, 3)
    first = memory.distances(feats)
    built = memory._bank_search[1]
    torch.testing.assert_close(memory.distances(feats), first, rtol=0, atol=0)
    assert memory._bank_search[1] is built and not built.gave_up
    torch.testing.assert_close(first.flatten(), _exact_nearest(patch_rows(feats), big), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(memory)  # a memory that has searched can still be copied (and pickled)
    torch.testing.assert_close(copied.distances(feats), first, rtol=0, atol=0)
    assert pickle.loads(pickle.dumps(built))(patch_rows(feats)).shape == (6,)
    memory.bank = big + 100.0
    assert float(memory.distances(feats).min()) > 100.0 and memory._bank_search[1] is not built
    monkeypatch.setattr(memory_module, "bf16_matmul_is_fast", lambda: False)
    assert memory_module.bank_search(big) is None


coreset_speed = load_benchmark("coreset_speed")


def _projected_in_float64(feats: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
    """The rows both coresets compare (same seeded projection), in float64, and the float32
    rounding bound of a squared distance ||x||^2 - 2 x.c + ||c||^2 of D-term dot products:
    each term within gamma_D = D * 2**-24 of its size, so a distance within 4 gamma_D max ||x||^2,
    and the difference of two such distances within twice that."""
    gen = torch.Generator().manual_seed(seed)
    x = feats.float()
    if x.shape[1] > memory_module.PROJECTION_DIM:
        x = x @ memory_module.sparse_random_projection(x.shape[1], memory_module.PROJECTION_DIM, gen)
    x = x.double()
    return x, 8 * x.shape[1] * 2**-24 * float((x * x).sum(dim=1).max())


def _distance_to_set(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Squared distance (float64) of every row of x to the nearest of the rows ``chosen``."""
    return torch.cdist(x, x[chosen]).amin(dim=1).pow(2)


def _farthest_first_slack(x: torch.Tensor, picked: torch.Tensor) -> float:
    """How much farther than the pick the farthest row was, at the worst step (0 for an exact trace)."""
    d, worst = torch.full((x.shape[0],), float("inf"), dtype=x.dtype), 0.0
    for i in range(1, len(picked)):
        d = torch.minimum(d, (x - x[picked[i - 1]]).pow(2).sum(dim=1))
        worst = max(worst, float(d.max() - d[picked[i]]))
    return worst


@pytest.mark.parametrize("candidates", [1024, 8, 1])
def test_greedy_coreset_picks_what_the_textbook_loop_picks(monkeypatch, candidates):
    """The candidate list + batched updates is an exact rewrite of the row-by-row loop: the
    same indices in the same order, also when a tiny list forces a batch update at almost
    every step (and with duplicate rows, which must still give distinct indices)."""
    monkeypatch.setattr(memory_module, "CORESET_CANDIDATES", candidates)
    feats = coreset_speed.clustered_features(3000, seed=1)
    picked = memory_module.greedy_coreset(feats, 300, seed=5)
    reference = coreset_speed.textbook_coreset(feats, 300, seed=5)
    if not torch.equal(picked, reference):  # bit for bit here (Xeon); elsewhere see below
        # Different code paths (batched matrix products vs one matrix-vector product a step)
        # round differently, so on another CPU the two may part at a near-tie, and only
        # there: at the first difference both rows are equally far up to float32 rounding,
        # and every pick of the package is the farthest row up to that rounding.
        x, tol = _projected_in_float64(feats, seed=5)
        i = int((picked != reference).nonzero()[0])
        d = _distance_to_set(x, picked[:i])
        assert abs(float(d[picked[i]] - d[reference[i]])) <= tol, i
        assert _farthest_first_slack(x, picked) <= tol
    doubled = torch.cat([feats[:40], feats[:40]])
    picked = memory_module.greedy_coreset(doubled, 60, seed=2)
    assert len(set(picked.tolist())) == 60
    assert {i % 40 for i in picked[:40].tolist()} == set(range(40))  # every distinct row before any copy


def test_blend_puts_each_map_on_the_good_images_scale():
    memory = PatchMemory(torch.zeros(1, 2))
    memory.calibrate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0]))
    assert (memory.residual_median, memory.distance_median) == (2.0, 20.0)
    residual, distance = torch.tensor([4.0, 2.0]), torch.tensor([20.0, 60.0])
    scales = blend_scales(memory, "median")
    assert blend(residual, distance, 0.0, scales).tolist() == pytest.approx([2.0, 1.0])  # the residual alone
    assert blend(residual, distance, 1.0, scales).tolist() == pytest.approx([1.0, 3.0])  # the distance alone
    assert blend(residual, distance, 0.8, scales).tolist() == pytest.approx([0.2 * 2 + 0.8 * 1, 0.2 * 1 + 0.8 * 3])
    # quantile: q90 -> 0 and q995 -> 1 for each map
    memory.calibrate(torch.arange(1001.0), torch.arange(1001.0) * 10)
    assert memory.residual_range == pytest.approx((900.0, 995.0)) and memory.distance_range == pytest.approx((9000.0, 9950.0))
    q = blend_scales(memory, "quantile")
    assert blend(torch.tensor([900.0, 995.0]), torch.tensor([9950.0, 9000.0]), 0.5, q).tolist() == pytest.approx([0.5, 0.5])
    # gated: the residual counts only above its q90 (0 on its scale); below, the distance alone decides.
    g = blend_scales(memory, "gated")
    assert g == q
    r, d = torch.tensor([0.0, 900.0, 995.0]), torch.tensor([9950.0, 9950.0, 9000.0])
    assert blend(r, d, 0.5, q).tolist() == pytest.approx([0.5 * -900 / 95 + 0.5, 0.5, 0.5])
    assert blend(r, d, 0.5, g, gate=True).tolist() == pytest.approx([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="'gated' but this memory bank has no quantile ranges"):
        blend_scales(PatchMemory(torch.zeros(1, 2)), "gated")
    with pytest.raises(ValueError, match="no quantile ranges"):
        blend_scales(PatchMemory(torch.zeros(1, 2)), "quantile")
    # A zero median (good images that are all in the bank) falls back to the mean, then to 1.
    memory.calibrate(torch.tensor([0.0, 0.0, 3.0]), torch.zeros(3))
    assert (memory.residual_median, memory.distance_median) == (1.0, 1.0)


def test_memory_tensors_round_trip():
    memory = PatchMemory(torch.randn(7, 3), 0.5, 2.5, (0.1, 0.9), (1.0, 3.0))
    back = PatchMemory.from_tensors(memory.to_tensors())
    assert torch.equal(back.bank, memory.bank)
    assert (back.residual_median, back.distance_median) == (0.5, 2.5)
    assert (back.residual_range, back.distance_range) == ((0.1, 0.9), (1.0, 3.0))
    older = {k: v for k, v in memory.to_tensors().items() if k != "memory.ranges"}  # saved before the quantile blend
    assert PatchMemory.from_tensors(older).residual_range is None
    # The pixel map's own residual scale travels too; a bank without it has none.
    assert "memory.pixel_residual" not in memory.to_tensors() and back.pixel_residual_median is None
    memory.calibrate(torch.arange(1001.0), torch.arange(1001.0) * 10, torch.arange(1001.0) * 2)
    back = PatchMemory.from_tensors(memory.to_tensors())
    assert back.pixel_residual_median == pytest.approx(1000.0) and back.pixel_residual_range == pytest.approx((1800.0, 1990.0))
    assert back.residual_range == pytest.approx((900.0, 995.0))
    assert blend_scales(back, "quantile", pixel=True) == pytest.approx((1800.0, 190.0, 9000.0, 950.0))
    assert blend_scales(back, "median", pixel=True) == pytest.approx((0.0, 1000.0, 0.0, 5000.0))
    with pytest.raises(ValueError, match="calibrated for one map"):
        blend_scales(PatchMemory(torch.zeros(1, 2), 1.0, 1.0, (0.0, 1.0), (0.0, 1.0)), "quantile", pixel=True)


def test_fit_stores_the_bank_and_scores_blend_residual_and_distance(tiny_mvtec, tmp_path):
    cfg = tiny_config(**{"infer.distance_weight": 0.8, "fit.bank_coreset": 0.5, "infer.blend": "median",
                         "infer.pixel_residual": "same", "infer.pixel_blend": "same"})
    fitted = stmae.fit(tiny_mvtec, tmp_path / "run", cfg, quiet=True)
    det = fitted.detector
    meta = json.loads((fitted.run_dir / "meta.json").read_text())
    # 7 fit images and 1 held out, grid 8: by default the bank is chosen from all 8 after calibration
    assert meta["memory"]["bank_patches"] == int(0.5 * 8 * 8 * 8)
    assert meta["memory"]["bank_patches_at_calibration"] == int(0.5 * 7 * 8 * 8)
    assert meta["memory"]["train_patches"] == 8 * 8 * 8 and meta["memory"]["held_out_images_banked"] == 1
    assert meta["memory"]["residual_median"] == det.memory.residual_median > 0

    loaded = stmae.load(fitted.run_dir, device="cpu")
    assert torch.equal(loaded.memory.bank, det.memory.bank)
    img = sorted((tiny_mvtec / "test" / "spot").glob("*.png"))[0]
    assert loaded.predict(img)[0].score == pytest.approx(det.predict(img)[0].score, rel=1e-6)

    # The grid map is exactly the blend of the residual and the nearest-patch distance.
    x = det.stats.apply(torch.randn(2, det.stats.mean.shape[0], 8, 8))
    expected = 0.2 * det.pipeline.residual(x) / det.memory.residual_median + 0.8 * det.memory.distances(x) / det.memory.distance_median
    assert torch.allclose(det.pipeline.grid_maps(x), expected)
    # infer.distance_weight = 0 on the same detector is the pure residual, and the threshold moved with the scale.
    det.config.infer.distance_weight = 0.0
    assert torch.equal(det.pipeline.grid_maps(x), det.pipeline.residual(x))
    det.memory = None
    det.config.infer.distance_weight = 0.5
    with pytest.raises(ValueError, match="no memory bank"):
        det.pipeline.grid_maps(x)


def test_calibration_medians_come_from_the_held_out_images_which_can_then_join_the_bank(tiny_mvtec, tmp_path):
    cfg = tiny_config(**{"infer.distance_weight": 0.5, "fit.held_out": 0.25, "fit.bank_coreset": 1.0,
                         "fit.bank_held_out": True})
    det = stmae.fit(tiny_mvtec, tmp_path / "run", cfg, quiet=True).detector
    from stmae.data import open_dataset
    from stmae.features import extract_features
    from stmae.model.memory import patch_rows

    samples = open_dataset(tiny_mvtec).train
    held_out = [s for s in samples if (s.name or str(s.path)) in det.meta["val_images"]]
    trained = [s for s in samples if (s.name or str(s.path)) not in det.meta["val_images"]]
    assert len(held_out) == 2 and len(trained) == 6
    feats = det.stats.apply(extract_features(det.extractor, held_out, 64, device="cpu", quiet=True))
    train_x = det.stats.apply(extract_features(det.extractor, trained, 64, device="cpu", quiet=True))
    # The medians were measured while the held-out images were unseen: against the training images' bank.
    unseen = PatchMemory(patch_rows(train_x))
    assert det.memory.residual_median == pytest.approx(float(det.pipeline.residual(feats).median()), rel=1e-5)
    assert det.memory.distance_median == pytest.approx(float(unseen.distances(feats).median()), rel=1e-5)
    # The pixel map's residual (plain squared error by default) got its own scale from the same images.
    from stmae.model.residual import feature_residual

    with torch.no_grad():
        mse = sum(feature_residual(det.model(feats, split), feats, "mse") for split in det.splits) / len(det.splits)
    assert det.memory.pixel_residual_median == pytest.approx(float(mse.median()), rel=1e-5)
    assert det.memory.pixel_residual_median != pytest.approx(det.memory.residual_median, rel=1e-2)
    # Then they joined the bank (coreset 1.0 keeps every patch): each of their patches is in it.
    memory = det.meta["memory"]
    assert det.memory.bank.shape[0] == memory["train_patches"] == 8 * 8 * 8 and memory["held_out_images_banked"] == 2
    assert memory["bank_patches_at_calibration"] == 6 * 8 * 8
    assert float(det.memory.distances(feats).max()) < 0.05 * det.memory.distance_median
    assert float(unseen.distances(feats).min()) > 0.05 * det.memory.distance_median


def test_no_bank_without_memory_and_old_runs_load_as_pure_residual(tiny_mvtec, tmp_path):
    fitted = stmae.fit(tiny_mvtec, tmp_path / "run", tiny_config(**{"infer.distance_weight": 0.0}), quiet=True)
    assert fitted.detector.memory is None and "memory" not in fitted.meta
    run = load_run(fitted.run_dir)
    assert run.memory is None and run.config.infer.distance_weight == 0.0
    # A config.yaml written before infer.distance_weight existed: those runs scored the pure residual.
    path = fitted.run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    del data["infer"]["distance_weight"], data["fit"]["bank_coreset"]
    path.write_text(yaml.safe_dump(data))
    assert Config().infer.distance_weight > 0  # the default would otherwise ask for a bank
    assert load_run(fitted.run_dir).config.infer.distance_weight == 0.0
    # A config that asks for the memory without a stored bank is refused, naming the file.
    data["infer"]["distance_weight"] = 0.8
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*no memory bank"):
        load_run(fitted.run_dir)


def test_runs_written_before_the_pixel_map_load_with_one_map(tiny_mvtec, tmp_path):
    fitted = stmae.fit(tiny_mvtec, tmp_path / "run", tiny_config(**{"infer.distance_weight": 0.8}), quiet=True)
    x = fitted.detector.stats.apply(torch.randn(2, fitted.detector.stats.mean.shape[0], 8, 8))
    pixel, score = fitted.detector.pipeline.grid_pair(x)
    assert (pixel - score).abs().max() > 1e-3  # the default: two maps
    # Such a run's config.yaml has no pixel keys and its bank no pixel scale: it scored one map.
    path = fitted.run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    del data["infer"]["pixel_residual"], data["infer"]["pixel_blend"]
    path.write_text(yaml.safe_dump(data))
    old = stmae.load(fitted.run_dir, device="cpu")
    assert (old.config.infer.pixel_residual, old.config.infer.pixel_blend) == ("same", "same")
    pixel, score = old.pipeline.grid_pair(x)
    assert pixel is score and torch.allclose(score, fitted.detector.pipeline.grid_pair(x)[1])
    # Asking that bank for a pixel map of its own is refused with what to do.
    old.memory.pixel_residual_median = old.memory.pixel_residual_range = None
    old.config.infer.pixel_residual = "mse"
    with pytest.raises(ValueError, match="calibrated for one map.*refit"):
        old.pipeline.grid_pair(x)


def test_memory_settings_are_validated_and_chosen_per_preset():
    with pytest.raises(ConfigError, match="infer.distance_weight must be in"):
        Config().override({"infer.distance_weight": 1.5}).validate()
    with pytest.raises(ConfigError, match="fit.bank_coreset"):
        Config().override({"fit.bank_coreset": 0.0}).validate()
    assert Config().infer.distance_weight == preset("accurate").infer.distance_weight == preset("fast").infer.distance_weight == 0.8
    assert preset("default").to_dict() == Config().to_dict()
    assert Config().infer.blend == preset("fast").infer.blend == "gated"
    assert preset("demo").infer.distance_weight == 0.0
    assert (preset("lowres").infer.distance_weight, preset("lowres").infer.blend) == (0.9, "quantile")
    with pytest.raises(ConfigError, match="infer.blend must be median, quantile or gated"):
        Config().override({"infer.blend": "max"}).validate()
    assert (Config().infer.pixel_residual, Config().infer.pixel_blend) == ("mse", "quantile")
    for name in ("demo", "lowres"):  # one map: tuned that way (demo), scored per image (lowres)
        assert (preset(name).infer.pixel_residual, preset(name).infer.pixel_blend) == ("same", "same")
    with pytest.raises(ConfigError, match="infer.pixel_residual must be one of"):
        Config().override({"infer.pixel_residual": "mahalanobis"}).validate()
    with pytest.raises(ConfigError, match="infer.pixel_blend must be one of"):
        Config().override({"infer.pixel_blend": "max"}).validate()
