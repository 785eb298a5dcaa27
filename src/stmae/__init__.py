"""stmae: Siamese Transition Masked Autoencoders for unsupervised visual anomaly detection.

Typical use::

    import stmae
    result = stmae.fit("path/to/category", "runs/mine", epochs=100)   # trains, writes a run folder
    detector = stmae.load("runs/mine")
    for p in detector.predict(["a.png", "b.png"]):
        print(p.score, p.label, p.anomaly_map.shape)

The CLI (``stmae --help``) is a thin layer over these calls.

Names are imported on first use (PEP 562): ``import stmae`` must not import torch, so that the
runtime of an exported model (:mod:`stmae.runtime`, numpy + Pillow + onnxruntime/OpenVINO)
works where torch is not installed. ``stmae.fit`` and friends import it when touched.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> module that defines it (imported lazily).
_LAZY = {
    "Config": ".config",
    "run_demo": ".demo",
    "Evaluation": ".evaluate",
    "evaluate": ".evaluate",
    "Detector": ".infer",
    "Prediction": ".prediction",
    "load": ".infer",
    "STMAE": ".model",
    "FitResult": ".train",
    "fit": ".train",
    "UpdateResult": ".update",
    "update": ".update",
    "export_model": ".export",
    "open_model": ".runtime",
}

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .config import Config
    from .demo import run_demo
    from .evaluate import Evaluation, evaluate
    from .export import export_model
    from .infer import Detector, load
    from .prediction import Prediction
    from .model import STMAE
    from .runtime import open_model
    from .train import FitResult, fit
    from .update import UpdateResult, update


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stmae' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            raise ImportError(
                f"stmae.{name} needs torch, which is not installed: pip install 'stmae[torch]' "
                "(an exported model runs without it: stmae.runtime.open_model)"
            ) from exc
        raise
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``stmae.evaluate`` the function when the submodule of the same name is imported.

    Importing ``stmae.evaluate`` (the module) binds it as an attribute of the package; the
    eager imports this file used to make rebound the name to the function right after. Lazily,
    this hook does the rebinding: a submodule that shadows a public name of its own is
    replaced by that name, as before.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f".{name}" and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "__version__",
    "Config",
    "Detector",
    "Evaluation",
    "FitResult",
    "Prediction",
    "STMAE",
    "UpdateResult",
    "evaluate",
    "export_model",
    "fit",
    "load",
    "open_model",
    "run_demo",
    "update",
]
