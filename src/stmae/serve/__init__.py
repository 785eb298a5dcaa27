"""``stmae serve``: an HTTP inspection service and a web page for a trained model.

- :func:`create_app` builds the FastAPI app for a loaded model (``POST /predict``,
  ``GET /health``, ``GET /info``, the page at ``/``, offline API docs at ``/docs``);
- :func:`load_model` loads a run folder or an exported model once;
- :func:`serve` does both and runs uvicorn (what the CLI verb calls);
- :class:`BackgroundServer` runs the app in a thread (tests, benchmarks).

FastAPI, uvicorn and python-multipart are the ``serve`` extra: ``pip install stmae[serve]``.
"""

from .app import MAX_FILES, MAX_PIXELS, MAX_REQUEST_BYTES, create_app
from .decode import UploadError, decode_upload
from .model import as_served, load_model, model_info
from .server import BackgroundServer, free_port, serve

__all__ = [
    "BackgroundServer",
    "MAX_FILES",
    "MAX_PIXELS",
    "MAX_REQUEST_BYTES",
    "UploadError",
    "as_served",
    "create_app",
    "decode_upload",
    "free_port",
    "load_model",
    "model_info",
    "serve",
]
