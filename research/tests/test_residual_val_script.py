"""research/residual_val.py: the variance head is a pure add-on to the model it rides on.

Its rows in docs/research.md rest on two claims: the head does not change how the
reconstruction trains (so its residual rows are the base model's), and its log-variance map
lies on the grid cells it predicts (so it is scored where it belongs).
"""

from __future__ import annotations

import copy

import torch

from stmae.model import STMAE, reconstruction_loss
import stmae.train as stmae_train

from tests.conftest import RESEARCH, load_benchmark

residual_val = load_benchmark("residual_val", RESEARCH)
PACKAGE_TRAIN = stmae_train.train_model

SIZE = dict(in_channels=8, grid_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=2,
            decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 8, 8, generator=gen)
    splits = torch.stack([torch.randperm(16, generator=gen).view(2, 8) for _ in range(3)])
    return x, splits


def test_variance_head_leaves_the_reconstruction_training_unchanged():
    x, splits = _inputs()
    torch.manual_seed(0)
    base = STMAE(**SIZE).train()
    with residual_val.variance_head():
        torch.manual_seed(0)
        head = STMAE(**SIZE).train()
        shared = {k: v for k, v in head.state_dict().items() if not k.startswith("var_head.")}
        assert shared.keys() == base.state_dict().keys()
        assert all(torch.equal(shared[k], v) for k, v in base.state_dict().items())  # same start
        assert not head.var_head.weight.any()  # zero-initialised: no random draw moved the rest
        with torch.no_grad():  # a trained head, so that a gradient through it would show
            head.var_head.weight.normal_()
        out = head(x, splits)
        assert out.shape == (3, 9, 8, 8)  # the log-variance rides as one extra channel in training
        swapped = stmae_train.train_model.keywords["loss"]  # the loss fit's training gets now
        assert swapped is residual_val._variance_loss
        swapped(out, x, 0.9).backward()
    reconstruction_loss(base(x, splits), x, 0.9).backward()
    for (name, p), q in zip(base.named_parameters(), (q for n, q in head.named_parameters() if not n.startswith("var_head."))):
        assert torch.equal(p.grad, q.grad), name  # the head's loss reaches no shared weight
    assert float(head.var_head.weight.grad.abs().sum()) > 0  # ... but trains the head
    # Outside the context the class and the training loop are the package's again.
    assert stmae_train.train_model is PACKAGE_TRAIN
    assert head.eval()(x, splits).shape == (3, 8, 8, 8)


def test_variance_map_sits_on_the_cells_it_predicts_and_survives_a_copy():
    x, splits = _inputs()
    with residual_val.variance_head(), torch.no_grad():
        model = STMAE(**SIZE).eval()
        assert model(x, splits).shape == (3, 8, 8, 8)  # scoring asks for the head explicitly
        cells = model.patch_size**2
        # A head that copies the reconstruction's first channel must give back that channel.
        model.var_head.weight.copy_(model.head.weight[:cells])
        model.var_head.bias.copy_(model.head.bias[:cells])
        seen: list[torch.Tensor] = []  # the decoder tokens both heads read
        hook = model.head.register_forward_hook(lambda mod, inp, res: seen.append(inp[0]))
        with residual_val.variance_out():
            out = model(x, splits)
            hook.remove()
            copied = copy.deepcopy(model)(x, splits)  # Detector deep-copies the model it is given
        assert not residual_val.VARIANCE_OUT["on"]  # and scoring goes back to the plain output
        # Same weights, but two Linear layers of different widths (32 vs 4 outputs) take
        # different GEMM kernels, which round differently on some CPUs (AMD EPYC without AMX):
        # equal up to float32 rounding, not bit for bit. Each output is a K-term dot product
        # plus the bias, within gamma_{K+1} = (K + 1) * 2**-24 of sum |w||x| + |b| of its exact
        # value, so two of them within twice that; a cell off its place is off by O(0.1).
        k = model.head.in_features
        scale = seen[0].abs() @ model.head.weight[:cells].abs().T + model.head.bias[:cells].abs()
        tol = 2 * (k + 1) * 2**-24 * float(scale.max())
    assert float((out[:, -1] - out[:, 0]).abs().max()) <= tol
    assert torch.equal(copied, out)  # the copy runs the very same layers on the same input
