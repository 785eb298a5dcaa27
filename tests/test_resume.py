"""A stopped fit continues from its saved training state and ends where an unstopped one does."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import stmae
import stmae.train as train_module
from stmae.checkpoint import CheckpointError
from stmae.cli import app
from stmae.resume import STATE_FILE

from .conftest import tiny_config

EPOCHS = 4


def _interrupted_fit(monkeypatch, data, run, cfg, stop_step: int) -> None:
    """A fit that saves its state at every epoch and is stopped (KeyboardInterrupt) at ``stop_step``."""
    real_lr = train_module.cosine_lr
    cfg = copy.deepcopy(cfg).override({"train.checkpoint_seconds": 0.0})  # not in the fingerprint: resumable with cfg

    def stopping_lr(step, total, warmup, base):
        if step == stop_step:
            raise KeyboardInterrupt
        return real_lr(step, total, warmup, base)

    monkeypatch.setattr(train_module, "cosine_lr", stopping_lr)
    with pytest.raises(KeyboardInterrupt):
        stmae.fit(data, run, cfg, quiet=True)
    monkeypatch.setattr(train_module, "cosine_lr", real_lr)


def _weights(result) -> dict[str, torch.Tensor]:
    return result.detector.model.state_dict()


def test_resumed_fit_equals_an_unstopped_one(tiny_mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.epochs": EPOCHS})
    whole = stmae.fit(tiny_mvtec, tmp_path / "whole", cfg, quiet=True)
    # 7 training images (1 held out), batch 4: 2 steps per epoch; step 5 is inside epoch 3.
    run = tmp_path / "stopped"
    _interrupted_fit(monkeypatch, tiny_mvtec, run, cfg, stop_step=5)
    assert (run / STATE_FILE).is_file()
    assert not (run / "meta.json").exists()  # nothing half-written looks like a finished run
    resumed = stmae.fit(tiny_mvtec, run, cfg, quiet=True, resume=True)
    assert resumed.meta["resumed_at_epoch"] == 2
    assert resumed.losses == whole.losses
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / STATE_FILE).exists()  # complete run: the state is gone
    assert resumed.meta["fit_seconds"] >= resumed.meta["train_seconds"] > 0


def test_resume_with_other_settings_is_refused(tiny_mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.epochs": EPOCHS})
    run = tmp_path / "stopped"
    _interrupted_fit(monkeypatch, tiny_mvtec, run, cfg, stop_step=3)
    with pytest.raises(CheckpointError, match=STATE_FILE + ".*other settings"):
        stmae.fit(tiny_mvtec, run, cfg, quiet=True, resume=True, train__lr=1e-2)
    # Inference settings and the device do not change what is trained: still resumable.
    res = stmae.fit(tiny_mvtec, run, cfg, quiet=True, resume=True, infer__num_pairs=3)
    assert res.meta["resumed_at_epoch"] == 1


@pytest.mark.parametrize("change", ["code_revision", "version"])
def test_resume_of_a_state_saved_by_other_code_is_refused(tiny_mvtec, tmp_path, monkeypatch, change):
    import stmae.resume as resume_module

    cfg = tiny_config(**{"train.epochs": EPOCHS})
    run = tmp_path / "stopped"
    _interrupted_fit(monkeypatch, tiny_mvtec, run, cfg, stop_step=3)
    if change == "code_revision":  # the package's source changed since the state was saved
        monkeypatch.setattr(resume_module, "code_revision", lambda: "0123456789abcdef")
    else:  # another release of the package
        monkeypatch.setattr(resume_module, "__version__", "9.9.9")
    with pytest.raises(CheckpointError, match=str(run / STATE_FILE) + ".*other code"):
        stmae.fit(tiny_mvtec, run, cfg, quiet=True, resume=True)
    assert (run / STATE_FILE).is_file()  # refused, not deleted


def test_fit_without_resume_warns_and_starts_afresh(tiny_mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(**{"train.epochs": EPOCHS})
    run = tmp_path / "stopped"
    _interrupted_fit(monkeypatch, tiny_mvtec, run, cfg, stop_step=3)
    with pytest.warns(UserWarning, match="starting afresh"):
        res = stmae.fit(tiny_mvtec, run, cfg, quiet=True)
    assert "resumed_at_epoch" not in res.meta
    assert not (run / STATE_FILE).exists()


def test_corrupt_state_is_named(tiny_mvtec, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="unreadable training state"):
        stmae.fit(tiny_mvtec, run, tiny_config(), quiet=True, resume=True)


def test_resume_without_saved_state_warns_and_is_a_plain_fit(tiny_mvtec, tmp_path):
    with pytest.warns(UserWarning, match="no saved training state; training from the start"):
        res = stmae.fit(tiny_mvtec, tmp_path / "fresh", tiny_config(), quiet=True, resume=True)
    assert "resumed_at_epoch" not in res.meta and (tmp_path / "fresh" / "meta.json").is_file()
    with pytest.warns(UserWarning, match="complete: nothing was stopped"):
        stmae.fit(tiny_mvtec, tmp_path / "fresh", tiny_config(), quiet=True, resume=True)


def test_cli_fit_resume(tiny_mvtec, tmp_path, monkeypatch):
    run = tmp_path / "stopped"
    cfg = tiny_config(**{"train.epochs": EPOCHS})
    cfg.save(tmp_path / "cfg.yaml")
    _interrupted_fit(monkeypatch, tiny_mvtec, run, cfg, stop_step=5)
    out = CliRunner().invoke(app, ["fit", str(tiny_mvtec), "--out", str(run), "--config", str(tmp_path / "cfg.yaml"),
                                   "--resume", "--quiet"])
    assert out.exit_code == 0, out.output
    assert f"resumed the saved training at epoch 2 of {EPOCHS}" in out.output
    assert (run / "meta.json").is_file() and not (run / STATE_FILE).exists()
