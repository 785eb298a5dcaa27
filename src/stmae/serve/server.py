"""Running the app: :func:`serve` for ``stmae serve``, :class:`BackgroundServer` for tests and benchmarks.

Why uvicorn's ``Server`` object rather than ``uvicorn.run`` everywhere: tests, the browser
check and the load benchmark need the real HTTP stack on a free local port, started and
stopped from the same process, without a subprocess to clean up.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .app import MAX_PIXELS, MAX_REQUEST_BYTES, create_app
from ..predlog import PredictionLog
from .model import load_model


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread; use as a context manager.

    ``url`` is the base address (``http://127.0.0.1:PORT``). Leaving the block asks uvicorn
    to finish the requests in flight and stop.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="stmae-serve-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_request_mb: float = MAX_REQUEST_BYTES / (1024 * 1024),
    max_pixels: int = MAX_PIXELS,
    workers: int = 1,
    device: str = "auto",
    log: Callable[[str], None] = print,
    prediction_log: str | os.PathLike | None = None,
) -> None:
    """Load the run folder or exported model at ``path`` once and serve it until interrupted.

    ``prediction_log``: the SQLite file every scored image is recorded in (None: none).
    """
    import uvicorn

    if max_request_mb <= 0:
        raise ValueError(f"--max-request-mb must be positive, got {max_request_mb}")
    model = load_model(path, device=device)
    plog = PredictionLog(prediction_log) if prediction_log is not None else None
    app = create_app(
        model, max_request_bytes=int(max_request_mb * 1024 * 1024), max_pixels=max_pixels, workers=workers,
        name=Path(path).resolve().name, log=plog, source=path, device=device,
    )
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {path} on http://{shown}:{port}/ (API docs at /docs; Ctrl+C stops)"
        + (f"; logging predictions to {prediction_log}" if plog is not None else ""))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if plog is not None:
            plog.close()


def default_log_path(path: str | os.PathLike) -> Path:
    """The prediction log beside a run folder or exported model: ``<name>.predictions.sqlite``."""
    p = Path(path).resolve()
    return p.parent / f"{p.name}.predictions.sqlite"


__all__ = ["BackgroundServer", "default_log_path", "free_port", "serve"]
