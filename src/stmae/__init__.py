"""stmae: Siamese Transition Masked Autoencoders for unsupervised visual anomaly detection.

Typical use::

    import stmae
    result = stmae.fit("path/to/category", "runs/mine", epochs=100)   # trains, writes a run folder
    detector = stmae.load("runs/mine")
    for p in detector.predict(["a.png", "b.png"]):
        print(p.score, p.label, p.anomaly_map.shape)

The CLI (``stmae --help``) is a thin layer over these calls.
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .demo import run_demo  # noqa: E402
from .evaluate import Evaluation, evaluate  # noqa: E402
from .infer import Detector, Prediction, load  # noqa: E402
from .model import STMAE  # noqa: E402
from .train import FitResult, fit  # noqa: E402

__all__ = [
    "__version__",
    "Config",
    "Detector",
    "Evaluation",
    "FitResult",
    "Prediction",
    "STMAE",
    "evaluate",
    "fit",
    "load",
    "run_demo",
]
