"""The FastAPI app: ``POST /predict``, ``GET /health``, ``GET /info``, the page at ``/``, docs.

Why it is built this way:

- **The model loads once** (the caller passes it in) and inference runs in a small thread
  pool of its own (``workers``, one by default). Requests queue there; the event loop only
  reads uploads and answers, so ``/health`` and ``/info`` answer at once even while a slow
  request is being scored. Torch's own thread settings are left alone.
- **A bad request is the client's problem, never the service's**: the body size is limited
  before it is read, every image goes through :func:`stmae.serve.decode.decode_upload`
  (content type, magic bytes, pixel count from the header, any decoder failure), and each
  of those ends as a 4xx JSON ``{"detail": "<what and why>"}``. Nothing a request sends is
  used as a file-system path.
- **Offline**: the page and the API docs are static files in the package; nothing is
  fetched from a CDN (FastAPI's default Swagger UI would be, so ``/docs`` is our own page
  rendering ``/openapi.json``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterator, BinaryIO, Optional

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..predlog import Entry, LogError, PredictionLog
from ..report import overlay
from ..data.io import SERVE_MAX_PIXELS
from .decode import UploadError, decode_upload
from .model import as_served, model_info

LOG = logging.getLogger("stmae.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"

#: Defaults of the limits (``stmae serve`` options override them).
MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_PIXELS = SERVE_MAX_PIXELS
MAX_FILES = 64
MAX_PENDING = 64
#: Longest side of a returned heat-map picture: enough to see a defect, small to send.
HEATMAP_SIDE = 512


class ImageResult(BaseModel):
    filename: str = Field(description="The uploaded file's name (base name only), for matching answers to files.")
    score: float = Field(description="Raw anomaly score: higher is more anomalous. Compare with `threshold`.")
    normalized: Optional[float] = Field(
        description="Score mapped to [0, 1]: 0 = a typical good image, 0.5 = the threshold, 1 = as far above "
        "the threshold as the threshold is above typical good images. Null for an uncalibrated model."
    )
    label: int = Field(description="1 = anomalous (score > threshold), 0 = good, -1 = no threshold known.")
    threshold: Optional[float] = Field(description="The threshold the label used (the model's or the override).")
    width: int = Field(description="Image width in pixels.")
    height: int = Field(description="Image height in pixels.")
    log_id: Optional[str] = Field(
        None, description="The prediction's id in the service's log, for POST /feedback (null without a log)."
    )
    heatmap: Optional[str] = Field(
        None, description="With ?heatmap=true: a base64 PNG of the anomaly map blended over the image "
        f"(longest side at most {HEATMAP_SIDE} px; colours scaled so the pixel threshold is mid-scale)."
    )


class Feedback(BaseModel):
    id: str = Field(description="The `log_id` of a result of POST /predict.")
    verdict: str = Field(description="`good` (a false alarm: the part is good) or `defect` (a missed or confirmed defect).")
    note: Optional[str] = Field(None, max_length=2000, description="Free text, e.g. the operator's name or reason.")


def _suffix(name: str) -> str:
    """A safe file suffix for a kept upload (its own, if it is a plain image extension)."""
    ext = Path(name).suffix.lower()
    return ext if ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp") else ".img"


class PredictResponse(BaseModel):
    results: list[ImageResult]
    seconds: float = Field(description="Time spent decoding and scoring this request (queueing excluded).")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong with the request and what to do about it.")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "No files, or a malformed multipart body.",
        413: "Request over the size limit, too many files, or an image over the pixel limit.",
        415: "Not an image: declared content type or first bytes.",
        422: "Empty or undecodable (e.g. truncated) image, or an invalid parameter.",
        503: "The service is busy (too many requests queued); retry later.",
    }.items()
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _internal_error(exc: Exception) -> JSONResponse:
    """A bug or a model failure, not the client's fault: said in JSON; the service lives on."""
    return _error(500, f"internal error while handling the request ({type(exc).__name__}: {exc})")


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, counted as it arrives.

    A declared Content-Length over the limit is refused before any byte is read; a chunked
    body is cut off at the limit (the error surfaces through FastAPI's body reading as an
    HTTPException, which it passes on unchanged).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        mb = self.max_bytes / (1024 * 1024)
        size = f"{self.max_bytes:,} bytes" + (f" ({mb:.4g} MiB)" if mb >= 1 else "")
        return (f"the request body is over this service's limit of {size}; "
                "send fewer or smaller images per request, or start the service with a larger --max-request-mb")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _error(400, f"invalid Content-Length header {declared[:40]!r}")(scope, receive, send)
                return
            if length > self.max_bytes:
                await _error(413, self.message())(scope, receive, send)
                return
        total = 0

        async def limited() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise StarletteHTTPException(413, self.message())
            return message

        await self.app(scope, limited, send)


def _display_name(name: str | None, index: int) -> str:
    """The client's file name without any folder part (never used as a path), or a placeholder."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    return base[:200] if base else f"file {index}"


def _heatmap_png(image: np.ndarray, amap: np.ndarray, threshold: float | None) -> str:
    """Base64 PNG of the map blended over the image, at most HEATMAP_SIDE px on the long side."""
    h, w = image.shape[:2]
    scale = min(1.0, HEATMAP_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    shown = image if size == (w, h) else np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    heat = amap if amap.shape == (size[1], size[0]) else np.asarray(
        Image.fromarray(amap.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    )
    buf = io.BytesIO()
    Image.fromarray(overlay(shown, heat, threshold)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Scorer:
    """The model plus its worker pool and a count of requests waiting or running."""

    def __init__(self, model: Any, workers: int, max_pending: int, max_pixels: int,
                 log: PredictionLog | None = None, identity: tuple[str, int] = ("model", 1)) -> None:
        self.model = model
        self.log = log
        self.identity = identity
        self.workers = workers
        self.max_pending = max_pending
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stmae-serve")
        self.pending = 0
        self.served = 0
        self._lock = threading.Lock()

    def score(self, uploads: list[tuple[str, BinaryIO, str | None]], threshold: float | None,
              heatmap: bool) -> dict[str, Any]:
        """Read, decode, score and (optionally) draw: runs in a pool thread.

        Uploads arrive as the parser's spooled files and are read here, one at a time, so a
        queue of waiting requests holds no decoded (or even fully buffered) images.
        """
        started = time.perf_counter()
        model, identity = self.model, self.identity  # one version per request, even across a swap
        raw: list[bytes] = []
        images = []
        for name, fileobj, ctype in uploads:
            raw.append(fileobj.read())
            images.append(decode_upload(raw[-1], name, max_pixels=self.max_pixels, content_type=ctype))
        try:
            preds = model.predict(images, threshold=threshold)
        except UploadError as exc:
            if exc.index is None:
                raise
            raise UploadError(exc.status, f"{uploads[exc.index][0]}: {exc.message}") from None
        results = []
        for (name, _, _), data, image, pred in zip(uploads, raw, images, preds):
            row: dict[str, Any] = {
                "filename": name,
                "score": float(pred.score),
                "normalized": None if pred.normalized is None else float(pred.normalized),
                "label": int(pred.label),
                "threshold": None if pred.threshold is None else float(pred.threshold),
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
            }
            if heatmap:
                scale = pred.pixel_threshold if pred.pixel_threshold is not None else model.threshold
                row["heatmap"] = _heatmap_png(image, pred.anomaly_map, scale)
            if self.log is not None:  # queued: the writer thread hashes and inserts
                row["log_id"] = self.log.record(Entry(
                    source=name, score=row["score"], normalized=row["normalized"], label=row["label"],
                    threshold=row["threshold"], model=identity[0], model_version=identity[1], data=data,
                    suffix=_suffix(name),
                ))
            results.append(row)
        return {"results": results, "seconds": round(time.perf_counter() - started, 4)}

    def swap(self, model: Any) -> None:
        """Serve ``model`` from the next request on; requests in flight finish on the old one."""
        version = int((getattr(model, "meta", None) or {}).get("model_version", 1))
        self.model, self.identity = model, (self.identity[0], version)

    def try_enter(self) -> bool:
        with self._lock:
            if self.pending >= self.max_pending:
                return False
            self.pending += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.pending -= 1
            self.served += 1


class _Watcher:
    """Polls a served model's files and swaps in a new version once it is complete."""

    def __init__(self, scorer: _Scorer, source: str | os.PathLike, device: str, seconds: float) -> None:
        self.scorer, self.source, self.device, self.seconds = scorer, Path(source), device, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stmae-watch", daemon=True)
        self._stamp = self._current()

    def _current(self) -> tuple[int, int] | None:
        target = self.source / "meta.json" if self.source.is_dir() else self.source
        try:
            st = target.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def seen(self) -> None:
        """The service swapped in the current files itself (POST /update)."""
        self._stamp = self._current()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from .model import load_model

        while not self._stop.wait(self.seconds):
            stamp = self._current()
            if stamp is None or stamp == self._stamp:
                continue
            try:
                model = load_model(self.source, device=self.device)
            except Exception:  # a broken new version: keep serving the old one until the next change
                LOG.warning("could not load the new version of %s; still serving the old one", self.source, exc_info=True)
                self._stamp = stamp
                continue
            self._stamp = stamp
            self.scorer.swap(model)
            LOG.info("now serving %s version %s", self.source, self.scorer.identity[1])


def create_app(
    model: Any,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_pixels: int = MAX_PIXELS,
    workers: int = 1,
    max_files: int = MAX_FILES,
    max_pending: int = MAX_PENDING,
    name: str | None = None,
    log: PredictionLog | None = None,
    source: str | os.PathLike | None = None,
    device: str = "auto",
    watch_seconds: float = 2.0,
) -> FastAPI:
    """The service for ``model`` (a Detector, an exported model, anything :func:`as_served` takes).

    ``max_request_bytes`` limits a whole request body, ``max_pixels`` each image (checked from
    its header), ``max_files`` the images per request; ``workers`` threads score (requests
    queue for them) and over ``max_pending`` queued requests the answer is 503. With ``log``
    every scored image is recorded there and ``GET /history`` pages through it.

    ``source``: the run folder or exported model ``model`` was loaded from. The service then
    watches it (every ``watch_seconds``) and serves a new version as soon as one is complete
    (``stmae update`` writes run folders atomically), and ``POST /update`` folds the parts
    marked good in the log into a served run folder. Requests in flight finish on the old
    version; none is dropped.
    """
    for label, value in (("max_request_bytes", max_request_bytes), ("max_pixels", max_pixels), ("workers", workers),
                         ("max_files", max_files), ("max_pending", max_pending)):
        if int(value) < 1:
            raise ValueError(f"{label} must be at least 1, got {value}")
    served = as_served(model)
    identity = (name or "model", int((getattr(model, "meta", None) or {}).get("model_version", 1)))
    scorer = _Scorer(served, workers, max_pending, max_pixels, log=log, identity=identity)
    service = {
        "name": name,
        "stmae_version": __version__,
        "limits": {"max_request_bytes": max_request_bytes, "max_pixels": max_pixels, "max_files": max_files},
        "workers": workers,
    }
    watcher = _Watcher(scorer, source, device, watch_seconds) if source is not None else None
    updating = threading.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            watcher.stop()
        scorer.pool.shutdown(wait=False, cancel_futures=True)
        if log is not None:
            log.flush()

    app = FastAPI(
        title="stmae inspection service",
        version=__version__,
        description="Score images for anomalies with a trained ST-MAE model. `POST /predict` with one or more "
        "images in the multipart field `files`. Errors are JSON `{\"detail\": \"...\"}` with a 4xx status.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.scorer = scorer
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "malformed request body: send multipart/form-data with the images in the field 'files'"
        return JSONResponse({"detail": str(detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return _internal_error(exc)

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=False, responses=ERRORS,
              summary="Score one or more images")
    async def predict(
        files: Optional[list[UploadFile]] = File(None, description="One or more images (PNG, JPEG, BMP, TIFF, WebP)."),
        threshold: Optional[float] = Query(None, description="Override the model's threshold for this request."),
        heatmap: bool = Query(False, description="Also return each heat map as a base64 PNG."),
    ) -> Any:
        if not files:
            return _error(400, "no files: send one or more images in the multipart field 'files', "
                               "e.g. curl -F files=@img.png http://HOST:PORT/predict")
        if len(files) > max_files:
            return _error(413, f"{len(files)} files in one request; this service takes at most {max_files}")
        if threshold is not None and not math.isfinite(threshold):
            return _error(422, f"threshold must be a finite number, got {threshold}")
        uploads = [(_display_name(f.filename, i), f.file, f.content_type) for i, f in enumerate(files)]
        if not scorer.try_enter():
            return JSONResponse({"detail": f"busy: {scorer.max_pending} requests are already queued; retry shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(scorer.pool, scorer.score, uploads, threshold, heatmap)
        except UploadError as exc:
            return _error(exc.status, exc.message)
        except ValueError as exc:  # the model refusing an input (stmae.data.DataError and the like)
            return _error(422, str(exc))
        except Exception as exc:  # a model failure: answered here so the connection stays usable
            LOG.exception("scoring failed")
            return _internal_error(exc)
        finally:
            scorer.leave()

    @app.get("/health", summary="Liveness and queue length")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pending": scorer.pending, "served": scorer.served, "workers": scorer.workers}

    @app.get("/info", summary="The model: metadata, thresholds, input size, limits")
    async def get_info() -> dict[str, Any]:
        current = scorer.model
        return {**model_info(current), **service, "model_version": scorer.identity[1], "threshold": current.threshold}

    @app.post("/feedback", summary="Mark a logged prediction: a good part (false alarm) or a defect")
    async def feedback(item: Feedback) -> Any:
        if log is None:
            return _error(404, "this service keeps no prediction log (start it with --log FILE), so feedback has nowhere to go")
        try:
            fid = await asyncio.get_running_loop().run_in_executor(None, log.add_feedback, item.id, item.verdict, item.note)
        except LogError as exc:
            status = 404 if "no logged prediction" in str(exc) else 422
            return _error(status, str(exc))
        return {"feedback_id": fid, "id": item.id, "verdict": item.verdict}

    @app.post("/update", summary="Fold the parts marked good in the log into the served model, then serve it")
    async def update_from_feedback() -> Any:
        if log is None or source is None or not Path(source).is_dir():
            return _error(404, "this service cannot update its model: it needs a prediction log and a run folder "
                               "(not an exported model) to write the new version to")
        if not updating.acquire(blocking=False):
            return _error(409, "an update is already running")
        try:
            from ..update import update_from_log

            def run() -> Any:
                log.flush()
                return update_from_log(source, log.path, model=scorer.identity[0], device=device, quiet=True)

            result = await asyncio.get_running_loop().run_in_executor(None, run)
            scorer.swap(result.detector)
            if watcher is not None:
                watcher.seen()
        except ValueError as exc:  # UpdateError: nothing to fold in, and the like
            return _error(422, str(exc))
        finally:
            updating.release()
        return {"version": result.entry["version"], "entry": result.entry}

    @app.get("/history", summary="Page through the prediction log, newest first")
    async def history(
        model: Optional[str] = Query(None, description="Only this model's rows."),
        label: Optional[int] = Query(None, ge=0, le=1, description="0 = passed, 1 = flagged."),
        since: Optional[str] = Query(None, description="ISO 8601 time (UTC if no offset), inclusive."),
        until: Optional[str] = Query(None, description="ISO 8601 time, exclusive."),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> Any:
        if log is None:
            return _error(404, "this service keeps no prediction log (start it with --log FILE)")
        try:
            total, rows = log.query(model=model, label=label, since=since, until=until, limit=limit, offset=offset)
        except LogError as exc:
            return _error(422, str(exc))
        return {"total": total, "offset": offset, "limit": limit, "rows": rows}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


__all__ = ["BodyLimit", "ImageResult", "PredictResponse", "create_app", "HEATMAP_SIDE", "MAX_FILES",
           "MAX_PENDING", "MAX_PIXELS", "MAX_REQUEST_BYTES"]
