"""The shape of the package: torch-free bottom layers, no import cycle, one holder of the fitted state."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stmae
from stmae.config import ConfigError
from stmae.model import PatchMemory
from stmae.scorer import Scorer

from .conftest import make_tiny_category, tiny_config

PACKAGE = Path(stmae.__file__).resolve().parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny fitted run with the memory on (the default blend, two maps)."""
    root = tmp_path_factory.mktemp("arch")
    data = make_tiny_category(root / "tiny", n_train=10, seed=2, masks=False)
    cfg = tiny_config(**{"train.epochs": 2, "fit.held_out": 0.3, "infer.distance_weight": 0.8})
    return stmae.fit(data, root / "run", cfg, quiet=True).run_dir


def test_config_and_runtime_import_with_torch_unimportable():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import stmae.config, stmae.runtime, stmae.scorer\n"
        "cfg = stmae.config.preset('default')\n"
        "print(cfg.infer.residual, sorted(m for m in sys.modules if m.startswith('torch') and sys.modules[m]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mse_cos", "[]"]


def _imports(path: Path) -> set[str]:
    """The stmae modules ``path`` imports, anywhere in the file (a function-level import is
    still a dependency), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    module = ".".join(("stmae",) + path.relative_to(PACKAGE).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        package = module
    else:
        package = module.rsplit(".", 1)[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stmae"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("stmae"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import runtime` imports a submodule
                found.add(f"{target}.{alias.name}")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("stmae",) + path.relative_to(PACKAGE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    edges = {a: {b for b in bs if not b.startswith(a + ".") and not (a == "stmae")} for a, bs in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert "stmae.fitting" in graph["stmae.train"] and "stmae.pipeline" in graph["stmae.fitting"]  # the walk sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The walker finds a cycle where there is one.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_config_imports_nothing_of_the_package_but_its_bottom_layer():
    assert _graph()["stmae.config"] <= {"stmae.fileio", "stmae.thresholds"}


def test_every_engine_is_one_scorer(run_dir):
    from stmae.infer import Detector
    from stmae.runtime import ExportedModel

    assert issubclass(Detector, Scorer) and issubclass(ExportedModel, Scorer)
    for cls in (Detector, ExportedModel):  # predict is implemented once, in the base
        assert "predict" not in vars(cls) and "iter_predict" not in vars(cls)
    det = stmae.load(run_dir, device="cpu")
    assert det.threshold == det.calibration.image_threshold
    det.threshold = 123.0  # an override on top of the calibration, not another copy
    assert det.threshold == 123.0 and det.calibration.image_threshold != 123.0
    del det.threshold
    assert det.threshold == det.calibration.image_threshold
    for bad in (float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="threshold must be"):
            det.threshold = bad


def _grid_input(det):
    gen = torch.Generator().manual_seed(0)
    g = det.config.features.grid_size
    return torch.randn(2, det.stats.mean.shape[0], g, g, generator=gen)


def test_changing_a_loaded_models_bank_or_calibration_in_place_is_what_it_scores(run_dir):
    det = stmae.load(run_dir, device="cpu")
    assert det.memory is det.pipeline.memory and det.stats is det.pipeline.feature_stats  # one holder
    x = _grid_input(det)
    before = det.pipeline.grid_pair(x)[1].clone()
    # In place: the blend's statistics (as calibrate() does)...
    det.memory.calibrate(before * 3.0, before * 2.0, before * 4.0)
    after_cal = det.pipeline.grid_pair(x)[1]
    fresh = stmae.load(run_dir, device="cpu")
    fresh.memory = PatchMemory.from_tensors(det.memory.to_tensors())  # a model built from the changed state
    torch.testing.assert_close(after_cal, fresh.pipeline.grid_pair(x)[1])
    assert (after_cal - before).abs().max() > 1e-3  # and it did change the scores
    # ...and the bank itself, in place: the bank search must not keep the old bank.
    det.memory.bank.mul_(0.0)
    dist = det.pipeline.distances(x)
    assert torch.allclose(dist, x.norm(dim=1), atol=1e-4)  # distance to the zero rows
    # Replacing a part by assignment is scored too.
    det.memory = None
    det.config.infer.distance_weight = 0.0
    assert torch.equal(det.pipeline.grid_pair(x)[1], det.pipeline.residual(x))


def test_fitted_state_is_one_state_dict_and_round_trips(run_dir):
    from safetensors.torch import load_file

    det = stmae.load(run_dir, device="cpu")
    stored = load_file(str(run_dir / "model.safetensors"))
    state = det.pipeline.fitted_state()
    assert sorted(state) == sorted(stored)  # the weights file is the module's state, key for key
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    assert any(k.startswith("memory.") for k in state) and any(k.startswith("model.") for k in state)


def test_fit_time_settings_are_locked_on_a_loaded_model(run_dir):
    det = stmae.load(run_dir, device="cpu")
    det.config.infer.num_pairs = 3  # predict-time: allowed, and followed
    assert det.splits.shape[0] == 3
    for section, key, value in [("fit", "bank_coreset", 0.5), ("fit", "threshold_rule", "fpr:0.1"),
                                ("features", "image_size", 128), ("fit", "held_out", 0.3)]:
        with pytest.raises(ConfigError, match=f"{section}.{key} is a fit-time setting"):
            setattr(getattr(det.config, section), key, value)
    with pytest.raises(ConfigError, match="fit-time"):
        det.config.set("fit.bank_held_out", False)


def test_runs_of_the_first_schema_load_through_the_one_migration(run_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    t = meta["calibration"]["image_threshold"]
    meta["run_schema"], meta["threshold"] = 1, t
    del meta["calibration"]
    (old / "meta.json").write_text(json.dumps(meta))
    det = stmae.load(old, device="cpu")
    assert det.threshold == t and det.calibration.rule == "max" and "threshold" not in det.meta
    scores = np.array(meta["calibration_scores"]["all"])
    assert det.calibration.center == pytest.approx(float(np.sort(scores)[len(scores) // 2]))


def test_runs_written_before_the_renames_load_and_score_the_same(run_dir, tmp_path):
    """A run folder whose config.yaml holds the settings under their old names (infer.memory,
    infer.memory_coreset, train.val_fraction, ...) loads through the one migration and scores
    exactly as the same run under the new names (the very same computation twice)."""
    import shutil

    import yaml

    from stmae.config import RENAMED_SETTINGS

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for was, now in RENAMED_SETTINGS.items():
        section, name = now.split(".")
        value = cfg[section].pop(name)
        cfg.setdefault(was.split(".")[0], {})[was.split(".")[1]] = value
    if not cfg["fit"]:
        del cfg["fit"]
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert "memory" in cfg["infer"] and "val_fraction" in cfg["train"]
    images = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    then, now = stmae.load(old, device="cpu"), stmae.load(run_dir, device="cpu")
    assert then.config.to_dict() == now.config.to_dict()
    assert [p.score for p in then.predict(images)] == [p.score for p in now.predict(images)]


def test_runs_written_with_the_removed_ablation_settings_load_through_the_one_migration(run_dir, tmp_path):
    """Run folders written before the ablation-only switches left the config hold them at their
    old values: dropped on load, the run scores as before; a run that used one is refused by name."""
    import shutil

    import yaml

    from stmae.checkpoint import CheckpointError
    from stmae.config import REMOVED_SETTINGS

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for key, (_, value) in REMOVED_SETTINGS.items():
        section, name = key.split(".")
        cfg[section][name] = value
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    then, now = stmae.load(old, device="cpu"), stmae.load(run_dir, device="cpu")
    assert then.config.to_dict() == now.config.to_dict()
    assert [p.score for p in then.predict(images)] == [p.score for p in now.predict(images)]
    cfg["train"]["ema"] = 0.99  # a run of the EMA variant: this stmae cannot score it as it was fitted
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(CheckpointError, match=r"config.yaml: train.ema = 0.99: train.ema was an ablation-only switch"):
        stmae.load(old, device="cpu")
