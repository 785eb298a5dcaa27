"""stmae_research.variants: the ablation-only switches, now research knobs, do what the
config switches did (research/ablation.py's rows rest on it)."""

from __future__ import annotations

import pytest
import torch

from stmae.config import ConfigError
from stmae.features import FeatureExtractor
from stmae.model import STMAE, complementary_splits, random_splits, reconstruction_loss
from stmae_research import variants
from stmae_research.variants import BlockSplits, CosWeightedLoss, Knobs, WeightAverage

from tests.conftest import tiny_config


def small_model(patch: int = 2) -> STMAE:
    torch.manual_seed(0)
    return STMAE(6, 8, patch_size=patch, embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
                 decoder_heads=2).eval()


def test_knobs_split_from_the_config_overrides_and_are_checked():
    rest, knobs = Knobs.split({"train.ema": 0.99, "features.pad": 2, "train.epochs": "x2", "features.aggregate": 3})
    assert rest == {"train.epochs": "x2", "features.aggregate": 3}
    assert knobs == Knobs(pad=2, ema=0.99) and knobs.changed() == {"features.pad": 2, "train.ema": 0.99}
    assert Knobs.split({"train.cos_weight": 0})[1].cos_weight == 0.0 and Knobs().changed() == {}
    cfg = tiny_config()  # 8x8 grid, patch 2: 16 tokens
    assert Knobs(pad=7, split_block=2, ema=0.5).validate(cfg)
    for bad, match in [(Knobs(pad=8), "features.pad must be in"), (Knobs(ema=1.0), "train.ema"),
                       (Knobs(split_block=4), "model.split_block: .*even number of blocks"),
                       (Knobs(split_block=3), "model.split_block: .*multiple of 3")]:
        with pytest.raises(ConfigError, match=match):
            bad.validate(cfg)
    for overrides in ({"features.standardize": 0}, {"features.pad": 1.5}, {"model.split_block": True}):
        with pytest.raises(ConfigError, match="cannot use"):
            Knobs.split(overrides)


def test_padded_extractor_is_a_crop_of_the_reflected_image():
    from stmae.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", layers=["stride4", "stride8"], pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64)
    padded = variants.PaddedExtractor(backbone, grid_size=8, aggregate=3, pad=2)(images)
    plain = FeatureExtractor(backbone, grid_size=8, aggregate=3)(images)
    assert padded.shape == plain.shape == (2, 64, 8, 8) and not torch.allclose(padded, plain, atol=1e-3)
    # 2 cells of an 8-cell grid over 64 px = 16 px of reflected image on every side
    big = FeatureExtractor(backbone, grid_size=12, aggregate=3)(torch.nn.functional.pad(images, (16,) * 4, mode="reflect"))
    assert torch.allclose(padded, big[..., 2:10, 2:10], atol=1e-5)
    cfg = tiny_config()
    assert type(variants.build_extractor(cfg, Knobs())) is FeatureExtractor
    built = variants.build_extractor(cfg, Knobs(pad=1))
    assert isinstance(built, variants.PaddedExtractor) and built.pad == 1 and built.grid_size == 8


def test_block_splits_keep_square_blocks_together():
    split = BlockSplits(2)(4, 64, torch.Generator().manual_seed(0))  # 8x8 tokens, 16 blocks
    assert split.shape == (4, 2, 32)
    for s in split:
        assert sorted(s.flatten().tolist()) == list(range(64))
        for half in s:
            members = set(half.tolist())
            for t in members:  # every token's 2x2 block lies in the same half
                corner = (t // 8 // 2 * 2) * 8 + (t % 8) // 2 * 2
                assert {corner, corner + 1, corner + 8, corner + 9} <= members
    # Inference splits in 4x4 blocks (16x16 tokens, 16 blocks): each pair halves the grid
    # along whole blocks, and the pairs follow the seed.
    fixed = complementary_splits(256, 3, seed=1, draw=BlockSplits(4))
    assert fixed.shape == (3, 2, 128)
    for s in fixed:
        assert sorted(s.flatten().tolist()) == list(range(256))
        for half in s:
            members = set(half.tolist())
            for t in members:
                corner = (t // 16 // 4 * 4) * 16 + (t % 16) // 4 * 4
                assert {corner + 16 * dr + dc for dr in range(4) for dc in range(4)} <= members
    assert torch.equal(fixed, complementary_splits(256, 3, seed=1, draw=BlockSplits(4)))  # not the global RNG
    assert not torch.equal(fixed, complementary_splits(256, 3, seed=2, draw=BlockSplits(4)))
    assert torch.equal(BlockSplits(1)(3, 16, torch.Generator().manual_seed(5)),
                       random_splits(3, 16, torch.Generator().manual_seed(5)))
    assert variants.split_drawer(Knobs()) is random_splits and variants.split_drawer(Knobs(split_block=2)) == BlockSplits(2)


@pytest.mark.parametrize("tokens,block,match", [(64, 3, "multiple of 3"), (36, 2, "3x3 blocks"), (48, 2, "square")])
def test_block_splits_that_cannot_halve_are_rejected(tokens, block, match):
    with pytest.raises(ValueError, match=match):
        BlockSplits(block)(1, tokens)


@pytest.mark.parametrize("patch", [1, 2])
def test_a_block_split_reconstruction_never_sees_its_own_half(patch):
    m = small_model(patch)
    feats = torch.randn(2, 6, 8, 8)
    split = BlockSplits(2)(2, m.num_tokens, torch.Generator().manual_seed(1))
    base = m(feats, split)
    side = m.side
    token = int(split[0, 0, 3])
    changed = feats.clone()
    r, c = token // side * patch, token % side * patch
    changed[0, :, r : r + patch, c : c + patch] += 50.0
    out = m(changed, split)

    def cells(t: int) -> tuple[slice, slice]:
        return slice(t // side * patch, t // side * patch + patch), slice(t % side * patch, t % side * patch + patch)

    for t in split[0, 0].tolist():  # its own half, block neighbours included, does not see it
        assert torch.equal(out[0, :, cells(t)[0], cells(t)[1]], base[0, :, cells(t)[0], cells(t)[1]])
    other = int(split[0, 1, 0])
    assert not torch.allclose(out[0, :, cells(other)[0], cells(other)[1]], base[0, :, cells(other)[0], cells(other)[1]])


def test_cos_weighted_loss_is_the_package_loss_at_weight_one_and_weighs_the_cosine_otherwise():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 6, 4, 4, generator=gen)
    r = (f + torch.randn(2, 6, 4, 4, generator=gen)).requires_grad_()
    for hard_mining in (0.0, 0.75):
        ours = CosWeightedLoss(1.0)(r, f, hard_mining)
        (g_ours,) = torch.autograd.grad(ours, r)
        package = reconstruction_loss(r, f, hard_mining)
        (g_package,) = torch.autograd.grad(package, r)
        assert torch.equal(ours, package) and torch.equal(g_ours, g_package)  # bit for bit
    r64, f64 = r.detach().double(), f.double()
    mse = ((r64 - f64) ** 2).mean().item()
    cosine = ((r64 * f64).sum(dim=1) / (r64.norm(dim=1) * f64.norm(dim=1))).mean().item()
    for weight in (0.5, 0.0):
        assert CosWeightedLoss(weight)(r, f).item() == pytest.approx(mse + weight * (1.0 - cosine), rel=1e-5)
    # MSE only, hard-mined: 24 easy cells (squared error 0.01), 8 hard ones (4.0); the easiest
    # 75 % count at 0.1, whatever the cosine of the cells.
    hard = torch.zeros(2, 1, 4, 4)
    hard[0, :, :2] = 1.0
    recon = f + torch.where(hard > 0, 2.0, 0.1)
    assert CosWeightedLoss(0.0)(recon, f).item() == pytest.approx((24 * 0.01 + 8 * 4) / 32, rel=1e-5)
    assert CosWeightedLoss(0.0)(recon, f, 0.75).item() == pytest.approx((24 * 0.1 * 0.01 + 8 * 4) / 32, rel=1e-5)


def test_weight_average_keeps_the_trajectory_and_returns_the_averaged_weights():
    from stmae.config import TrainConfig
    from stmae.train import train_model

    torch.manual_seed(0)
    feats = torch.randn(1, 6, 1, 1).expand(12, 6, 8, 8) + 0.05 * torch.randn(12, 6, 8, 8)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=3e-3, warmup_epochs=1)
    plain, averaged = small_model(), small_model()
    start = [p.detach().clone() for p in averaged.parameters()]
    losses = train_model(plain, feats, cfg, torch.device("cpu"), quiet=True)
    seen: list[list[torch.Tensor]] = []
    average = WeightAverage(averaged, 0.9)

    def step(i: int) -> None:
        seen.append([p.detach().clone() for p in averaged.parameters()])
        average(i)

    assert train_model(averaged, feats, cfg, torch.device("cpu"), quiet=True, after_step=step) == losses
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), averaged.parameters()))  # same trajectory
    average.apply()
    # the kept weights: the warmed-up exponential average of the weights after each step
    expected = start
    for i, weights in enumerate(seen):
        decay = min(0.9, (1.0 + i) / (10.0 + i))
        expected = [e + (1.0 - decay) * (w - e) for e, w in zip(expected, weights)]
    for got, want, last in zip(averaged.parameters(), expected, plain.parameters()):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, last)


def test_variant_training_and_detector_use_every_knob():
    cfg = tiny_config()
    feats = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(2)) * 3.0 + 1.0
    raw = variants.feature_stats(feats, Knobs(standardize=False))
    assert torch.equal(raw.apply(feats), feats)  # standardize off: raw features
    stats = variants.feature_stats(feats, Knobs())
    assert stats.apply(feats).mean().abs() < 1e-4

    def trained(knobs: Knobs) -> tuple[STMAE, list[float]]:
        model = small_model()
        return model, variants.train(model, stats.apply(feats), cfg, knobs, torch.device("cpu"))

    base_model, base_losses = trained(Knobs())
    for knobs in (Knobs(split_block=2), Knobs(ema=0.9), Knobs(cos_weight=0.0)):
        model, losses = trained(knobs)
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base_model.parameters())), knobs
        if knobs.ema:
            assert losses == base_losses  # the average changes the kept weights, not the training
    ext = variants.build_extractor(cfg, Knobs())
    cfg.infer.num_pairs = 3
    det = variants.detector(ext, base_model, stats, cfg, Knobs(split_block=2))
    assert torch.equal(det.pipeline.splits, complementary_splits(16, 3, seed=cfg.train.seed, draw=BlockSplits(2)))
    assert not torch.equal(det.pipeline.splits, variants.detector(ext, base_model, stats, cfg, Knobs()).pipeline.splits)


def test_ablation_variants_resolve_into_config_and_knobs():
    from tests.conftest import RESEARCH, load_benchmark

    ablation = load_benchmark("ablation", RESEARCH)
    base = ablation.protocol_config(ablation.PROTOCOLS["fmnist"])
    cfg, knobs = ablation.resolve_variant(base, ablation.TRAIN_VARIANTS["ema_0.99"])
    assert cfg.to_dict() == base.to_dict() and knobs == Knobs(ema=0.99)
    cfg, knobs = ablation.resolve_variant(base, ablation.TRAIN_VARIANTS["accurate_model_x2"])
    assert cfg.train.epochs == 2 * base.train.epochs and knobs == Knobs()
    assert ablation.resolve_variant(base, ablation.TRAIN_VARIANTS["aggregate_1"]) is None  # the base already
    cache = ablation.FeatureCache()
    assert cache.feature_key(base, Knobs(pad=2)) != cache.feature_key(base) == cache.feature_key(base, Knobs(ema=0.5))
    assert cache.feature_key(base, Knobs(standardize=False)) != cache.feature_key(base)  # its kNN row is re-run
    with pytest.raises(ConfigError, match="model.split_block"):
        ablation.resolve_variant(base, {"model.split_block": 3})
    for name, overrides in ablation.TRAIN_VARIANTS.items():  # every row of the table still resolves
        ablation.resolve_variant(base, overrides)
