"""The ST-MAE model: token layout, the leakage invariant, splits and losses."""

from __future__ import annotations

import pytest
import torch

from stmae.model import STMAE, complementary_splits, feature_residual, random_splits, reconstruction_loss


def small_model(patch: int = 2) -> STMAE:
    torch.manual_seed(0)
    return STMAE(6, 8, patch_size=patch, embed_dim=32, depth=2, num_heads=4, decoder_dim=32, decoder_depth=2, decoder_heads=4).eval()


def patch_slice(model: STMAE, token: int) -> tuple[slice, slice]:
    row, col = divmod(token, model.side)
    p = model.patch_size
    return slice(row * p, (row + 1) * p), slice(col * p, (col + 1) * p)


def test_patchify_round_trip_and_row_major_order():
    m = small_model()
    feats = torch.randn(2, 6, 8, 8)
    tokens = m.patchify(feats)
    assert tokens.shape == (2, 16, 6 * 4)
    assert torch.equal(m.unpatchify(tokens), feats)
    # token 5 = row 1, col 1 of the 4x4 patch grid -> grid cells [2:4, 2:4]
    assert torch.equal(tokens[0, 5].view(6, 2, 2), feats[0, :, 2:4, 2:4])


@pytest.mark.parametrize("patch", [1, 2])
def test_reconstruction_of_a_patch_never_sees_that_patch(patch):
    """Changing one patch's input features leaves its own reconstruction (and its half's) unchanged."""
    m = small_model(patch)
    feats = torch.randn(3, 6, 8, 8)
    split = random_splits(3, m.num_tokens, torch.Generator().manual_seed(1))
    base = m(feats, split)
    for img, half in [(0, 0), (1, 1), (2, 0)]:
        token = int(split[img, half, 3])
        changed = feats.clone()
        rows, cols = patch_slice(m, token)
        changed[img, :, rows, cols] += 50.0 * torch.randn_like(changed[img, :, rows, cols])
        out = m(changed, split)
        same_half = split[img, half]
        for t in same_half.tolist():
            r, c = patch_slice(m, t)
            assert torch.equal(out[img, :, r, c], base[img, :, r, c])
        # the other half *does* depend on it (otherwise the test would prove nothing)
        other = split[img, 1 - half, 0].item()
        r, c = patch_slice(m, other)
        assert not torch.allclose(out[img, :, r, c], base[img, :, r, c])
        # other images in the batch are untouched
        assert torch.equal(out[[i for i in range(3) if i != img]], base[[i for i in range(3) if i != img]])


def test_reconstruction_is_in_input_spatial_order():
    """A token's prediction lands at its own position: order is restored before the reshape.

    Train-free check: with the decoder head zeroed except its bias, each output equals the
    bias; instead we verify equivariance to split relabelling — swapping A and B gives the
    same reconstruction, which only holds if outputs are scattered by index.
    """
    m = small_model()
    feats = torch.randn(2, 6, 8, 8)
    split = random_splits(2, m.num_tokens, torch.Generator().manual_seed(3))
    swapped = split.flip(1)
    assert torch.allclose(m(feats, split), m(feats, swapped), atol=1e-5)
    # and the same split with shuffled order inside each half gives the same result
    shuffled = torch.stack([s[:, torch.randperm(s.shape[1])] for s in split])
    assert torch.allclose(m(feats, split), m(feats, shuffled), atol=1e-5)


def test_random_splits_are_disjoint_equal_halves():
    split = random_splits(5, 16, torch.Generator().manual_seed(0))
    assert split.shape == (5, 2, 8)
    for s in split:
        assert sorted(s.flatten().tolist()) == list(range(16))
    assert not torch.equal(split[0], split[1])


def test_complementary_splits_deterministic():
    a = complementary_splits(16, 4, seed=7)
    assert torch.equal(a, complementary_splits(16, 4, seed=7))
    assert not torch.equal(a, complementary_splits(16, 4, seed=8))
    assert a.shape == (4, 2, 8)
    # drawn by the drawer given, from a generator of that seed: the same as random_splits of it
    assert torch.equal(a, random_splits(4, 16, torch.Generator().manual_seed(7)))
    seen = []
    flipped = complementary_splits(16, 4, seed=7, draw=lambda *args: seen.append(args[:2]) or random_splits(*args).flip(1))
    assert seen == [(4, 16)] and torch.equal(flipped, a.flip(1))


def test_odd_token_count_rejected():
    with pytest.raises(ValueError, match="even"):
        random_splits(1, 9)


def test_split_shape_checked():
    m = small_model()
    with pytest.raises(ValueError, match="split must have shape"):
        m(torch.randn(2, 6, 8, 8), torch.zeros(2, 2, 5, dtype=torch.long))


def test_loss_and_residuals():
    f = torch.randn(2, 6, 4, 4)
    assert reconstruction_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert reconstruction_loss(-f, f).item() == pytest.approx((4 * f.pow(2)).mean().item() + 2.0, rel=1e-4)
    # Hard mining: 24 easy cells (squared error 0.01) and 8 hard ones (4.0), all with cosine 1
    # (one positive channel); the easiest 75 % count at 0.1, so the loss is
    # (24 * 0.1 * 0.01 + 8 * 4) / 32, not the plain mean.
    one = torch.ones(2, 1, 4, 4)
    hard = torch.zeros(2, 1, 4, 4)
    hard[0, :, :2] = 1.0
    recon = one + torch.where(hard > 0, 2.0, 0.1)
    assert reconstruction_loss(recon, one).item() == pytest.approx((24 * 0.01 + 8 * 4) / 32, rel=1e-5)
    assert reconstruction_loss(recon, one, hard_mining=0.75).item() == pytest.approx((24 * 0.1 * 0.01 + 8 * 4) / 32, rel=1e-5)
    # The plain loss against a hand computation in float64: the mean squared error plus the
    # mean of 1 - cosine over the grid cells (cosine along channels).
    # float32 sums of 192 terms against float64: rel 1e-5 is far above their rounding.
    r = f + torch.randn(2, 6, 4, 4)
    r64, f64 = r.double(), f.double()
    mse = ((r64 - f64) ** 2).mean().item()
    cosine = ((r64 * f64).sum(dim=1) / (r64.norm(dim=1) * f64.norm(dim=1))).mean().item()
    assert reconstruction_loss(r, f).item() == pytest.approx(mse + 1.0 - cosine, rel=1e-5)
    r = f + 1.0
    mse = feature_residual(r, f, "mse")
    assert mse.shape == (2, 4, 4) and torch.allclose(mse, torch.ones(2, 4, 4))
    cos = feature_residual(-f, f, "cos")
    assert torch.allclose(cos, torch.full((2, 4, 4), 2.0), atol=1e-5)
    assert torch.allclose(feature_residual(r, f, "mse_cos"), mse * feature_residual(r, f, "cos"))
    with pytest.raises(ValueError, match="unknown residual"):
        feature_residual(r, f, "l1")
    with pytest.raises(ValueError, match="needs ResidualStats"):
        feature_residual(r, f, "mahalanobis")


def test_mahalanobis_residual_matches_explicit_formula():
    from stmae.model import ResidualAccumulator

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=gen)
    feats = [torch.randn(3, 5, 4, 4, generator=gen) for _ in range(2)]
    recons = [f + torch.einsum("cd,ndhw->nchw", mix, torch.randn(f.shape, generator=gen)) + 0.5 for f in feats]
    acc = ResidualAccumulator(5)
    for r, f in zip(recons, feats):
        acc.add(r, f)
    stats = acc.finish(shrinkage=0.1)
    vecs = torch.cat([(r - f).permute(0, 2, 3, 1).reshape(-1, 5) for r, f in zip(recons, feats)]).double()
    cov = torch.cov(vecs.T)
    cov = 0.9 * cov + 0.1 * cov.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(stats.mean.double(), vecs.mean(0), atol=1e-5)
    assert torch.allclose(stats.precision.double(), torch.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    d = (recons[0] - feats[0]).permute(0, 2, 3, 1).double() - vecs.mean(0)
    expected = torch.einsum("nhwc,cd,nhwd->nhw", d, torch.linalg.inv(cov), d)
    got = feature_residual(recons[0], feats[0], "mahalanobis", stats)
    assert got.shape == (3, 4, 4)
    assert torch.allclose(got.double(), expected, rtol=1e-3, atol=1e-4)
    # A residual along a direction good images never err in scores far higher than an
    # equally large one along their usual error direction.
    usual = torch.linalg.eigh(cov).eigenvectors[:, -1].float()
    rare = torch.linalg.eigh(cov).eigenvectors[:, 0].float()
    base = torch.zeros(1, 5, 1, 1)
    m = stats.mean.view(1, 5, 1, 1)
    s_usual = feature_residual(base + m + 3 * usual.view(1, 5, 1, 1), base, "mahalanobis", stats)
    s_rare = feature_residual(base + m + 3 * rare.view(1, 5, 1, 1), base, "mahalanobis", stats)
    assert s_rare.item() > 5 * s_usual.item()


def test_training_reduces_loss():
    from stmae.config import TrainConfig
    from stmae.train import train_model

    torch.manual_seed(0)
    base = torch.randn(1, 6, 1, 1)
    feats = base.expand(12, 6, 8, 8) + 0.05 * torch.randn(12, 6, 8, 8)
    m = STMAE(6, 8, patch_size=2, embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    losses = train_model(m, feats, TrainConfig(epochs=15, batch_size=4, lr=3e-3, warmup_epochs=1), torch.device("cpu"), quiet=True)
    assert losses[-1] < 0.5 * losses[0]
    assert not m.training


def test_training_goes_through_its_loss_split_and_step_hooks():
    """train_model's extension points: each is what the loop uses, and the defaults are the package's."""
    from stmae.config import TrainConfig
    from stmae.train import train_model

    def model() -> STMAE:
        torch.manual_seed(0)
        return small_model()

    feats = torch.randn(6, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_epochs=1, hard_mining=0.5)
    plain = model()
    losses = train_model(plain, feats, cfg, torch.device("cpu"), quiet=True)
    calls: dict[str, list] = {"loss": [], "split": [], "step": []}

    def loss(recon: torch.Tensor, x: torch.Tensor, hard_mining: float) -> torch.Tensor:
        calls["loss"].append(hard_mining)
        return reconstruction_loss(recon, x, hard_mining)

    def draw(batch: int, tokens: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        calls["split"].append(batch)
        return random_splits(batch, tokens, gen, device)

    hooked = model()
    assert train_model(hooked, feats, cfg, torch.device("cpu"), quiet=True, loss=loss, draw_splits=draw,
                       after_step=calls["step"].append) == losses  # the same training, step for step
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), hooked.state_dict().values()))
    assert calls == {"loss": [0.5] * 4, "split": [4, 2, 4, 2], "step": [0, 1, 2, 3]}
    # another loss and another split are what the loop then trains with
    doubled = train_model(model(), feats, cfg, torch.device("cpu"), quiet=True,
                          loss=lambda r, x, h: 2.0 * reconstruction_loss(r, x, h))
    assert doubled[0] == pytest.approx(2.0 * losses[0], rel=1e-6)
    reversed_halves = train_model(model(), feats, cfg, torch.device("cpu"), quiet=True,
                                  draw_splits=lambda *args: random_splits(*args).flip(1))
    assert reversed_halves != losses
