"""Fuzz image decoding and prediction: seeded cases, counted by kind; a crash must never happen.

Why: ``stmae predict``/``test`` and the HTTP service read files nobody curated. The promise
(docs/reliability.md) is that every input either scores or fails with a documented error
type -- :class:`stmae.data.DataError` (its subclass ``UnreadableImageError`` names the file
and the problem) -- never with a stray ``struct.error``, ``EOFError`` or
``DecompressionBombError`` that would end a batch or answer 500. A *crash* is any other
exception, or a ``DecompressionBombWarning`` escaping (PIL's warning, which stmae must not
trigger for images it refuses). Each case is decoded by every target that takes its input,
and every image that decodes is then scored by ``Detector.predict`` with a tiny fitted
detector, where again only ``DataError`` may come out.

Kinds of cases (see :data:`KINDS`): random bytes, random bytes behind a real magic number,
real PNG/JPEG/BMP/TIFF/WebP/GIF/PPM files in every PIL mode each format saves (with EXIF,
compression and multi-frame variants) -- intact, truncated or with corrupted bytes --,
lying headers (width/height patched to 0, 1, huge or random values), decompression bombs,
extreme sizes (1 x N), in-memory PIL images of every mode and numpy arrays of every dtype
and odd shape (NaN/inf included).

Targets (:data:`TARGETS`) are the entry points fed with cases; the service helper can append
one that uploads ``bytes`` cases to ``/predict`` through FastAPI's ``TestClient`` and counts
a 5xx as a crash. Each target is a :class:`Target`: a name, which payloads it takes, and a
``run(case, ctx)`` that returns the decoded image (or None) and lets documented errors
through.

Run (cases are independent: case ``i`` is rebuilt from ``(seed, i)``, ``--case i`` replays one)::

    nice -n 10 python benchmarks/fuzz.py --cases 10000 --seed 0 --max-seconds 1800

Writes ``benchmarks/results/fuzz.json`` (provenance, per-kind and per-target counts, crashes).
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

import stmae
from stmae import provenance
from stmae.data import DataError, decode_image_bytes, read_image
from stmae.data.io import as_rgb
from stmae.fileio import atomic_write_json

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "fuzz.json"
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
# Save options per format, to reach more decoder paths than the defaults do.
SAVE_PARAMS: dict[str, list[dict[str, Any]]] = {
    "PNG": [{}, {"optimize": True}],
    "JPEG": [{}, {"progressive": True}, {"quality": 5}, {"subsampling": 0}],
    "BMP": [{}],
    "TIFF": [{}, {"compression": "tiff_lzw"}, {"compression": "tiff_adobe_deflate"}, {"compression": "packbits"}],
    "WEBP": [{}, {"lossless": True}],
    "GIF": [{}],
    "PPM": [{}],
}
MAGIC = {
    "PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff\xe0", "BMP": b"BM", "TIFF": b"II*\x00",
    "TIFF_BE": b"MM\x00*", "GIF": b"GIF89a", "WEBP": b"RIFF\x00\x00\x00\x00WEBPVP8 ", "PPM": b"P6\n",
}
# Widths/heights a lying header claims: degenerate, boundary and huge values.
SPECIAL_SIDES = (0, 1, 2, 7, 255, 256, 4095, 8000, 8001, 65535, 65536, 2**31 - 1, 2**32 - 1)
ARRAY_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "int64", "uint32", "float16", "float32", "float64", "bool", "complex64")

Payload = bytes | Image.Image | np.ndarray


@dataclass
class Case:
    """One fuzz input: ``payload`` is encoded ``bytes``, a PIL image or a numpy array."""

    kind: str
    name: str
    payload: Payload


@dataclass
class Context:
    """What targets need: a fitted detector and a scratch folder for files."""

    detector: Any
    scratch: Path
    client: Any = None  # the HTTP service, started on first use (a FastAPI TestClient)


@dataclass
class Target:
    """An entry point that is fed fuzz cases.

    ``takes`` is the payload type it accepts; ``run`` returns the decoded RGB image (then
    scored by ``Detector.predict``) or None when the target scores by itself (a service).
    Exceptions of ``allowed`` types are documented outcomes; anything else is a crash.
    """

    name: str
    takes: type | tuple[type, ...]
    run: Callable[[Case, Context], np.ndarray | None]
    allowed: tuple[type[BaseException], ...] = (DataError,)


def _decode_bytes(case: Case, ctx: Context) -> np.ndarray:
    return decode_image_bytes(case.payload, case.name)  # type: ignore[arg-type]


def _read_file(case: Case, ctx: Context) -> np.ndarray:
    path = ctx.scratch / case.name
    path.write_bytes(case.payload)  # type: ignore[arg-type]
    try:
        return read_image(path)
    finally:
        path.unlink()


def _as_rgb(case: Case, ctx: Context) -> np.ndarray:
    return as_rgb(case.payload)  # type: ignore[arg-type]


class ServiceRefusal(Exception):
    """The service answered 4xx: a documented outcome (a 5xx is a crash)."""


def _serve_upload(case: Case, ctx: Context) -> None:
    """POST the bytes to ``/predict`` of the HTTP service (stmae.serve) as an upload."""
    if ctx.client is None:
        from fastapi.testclient import TestClient

        from stmae.serve import create_app

        ctx.client = TestClient(create_app(ctx.detector))
        ctx.client.__enter__()  # starts the service's worker pool
    r = ctx.client.post("/predict", files=[("files", (case.name, case.payload, "image/png"))])
    if r.status_code >= 500:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    if r.status_code >= 400:
        raise ServiceRefusal(r.json().get("detail", r.text)[:200])
    return None


#: The entry points every case goes through (those whose ``takes`` matches its payload).
TARGETS: list[Target] = [
    Target("decode_image_bytes", bytes, _decode_bytes),
    Target("read_image", bytes, _read_file),
    Target("as_rgb", (Image.Image, np.ndarray), _as_rgb),
    Target("serve /predict", bytes, _serve_upload, (ServiceRefusal,)),
]


# ---------------------------------------------------------------------------- real files
def random_image(rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    """An image of ``mode`` with random raw bytes (random floats, NaN and inf included, for F)."""
    size = len(Image.new(mode, (width, height)).tobytes())
    return Image.frombytes(mode, (width, height), rng.bytes(size))


def encode(img: Image.Image, fmt: str, params: dict[str, Any] | None = None, frames: int = 1,
           orientation: int | None = None) -> bytes:
    """``img`` saved as ``fmt`` (with ``frames`` frames and an EXIF orientation when given)."""
    buf = io.BytesIO()
    options = dict(params or {})
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    if frames > 1:
        options.update(save_all=True, append_images=[img.transpose(Image.Transpose.ROTATE_180)] * (frames - 1))
    img.save(buf, fmt, **options)
    return buf.getvalue()


@lru_cache(maxsize=1)
def savable() -> tuple[tuple[str, str], ...]:
    """Every (format, mode) pair this Pillow can write."""
    pairs = []
    for fmt in FORMATS:
        for mode in Image.MODES:
            try:
                encode(Image.new(mode, (3, 2)), fmt)
            except Exception:  # noqa: BLE001 - not writable: not a pair
                continue
            pairs.append((fmt, mode))
    return tuple(pairs)


def real_file(fmt: str, mode: str, width: int, height: int, seed: int, variant: int = 0) -> bytes:
    """A valid ``fmt`` file of random pixels; ``variant`` picks save options, EXIF and frames."""
    rng = np.random.default_rng(seed)
    img = random_image(rng, mode, width, height)
    params = SAVE_PARAMS[fmt][variant % len(SAVE_PARAMS[fmt])]
    orientation = ((variant // 4) % 9 or None) if fmt in ("JPEG", "PNG", "TIFF", "WEBP") else None
    frames = 2 if variant % 7 == 6 and fmt in ("GIF", "TIFF", "PNG", "WEBP") else 1
    for attempt in ((params, frames, orientation), ({}, 1, None)):
        try:
            return encode(img, fmt, *attempt)
        except Exception:  # noqa: BLE001 - this mode/option pair is not writable; plainer one
            continue
    try:
        return encode(img.convert("RGB"), fmt)
    except Exception:  # noqa: BLE001 - e.g. WebP's 16383-pixel side limit: a PNG then
        return encode(img.convert("RGB"), "PNG")


def truncate(data: bytes, keep: int) -> bytes:
    return data[: max(0, min(keep, len(data)))]


def corrupt(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """``data`` with byte ``pos % len`` set to ``value`` for each ``(pos, value)``."""
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value & 0xFF
    return bytes(out)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit palette PNG claiming ``width`` x ``height`` whose data is a small zlib stream of
    zeros (real bombs compress ~1000:1; this one stops after 2 MB of rows to stay cheap)."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    rows = min(height, max(1, (2 << 20) // max(1, len(row))))
    data = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width & 0xFFFFFFFF, height & 0xFFFFFFFF, 1, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"PLTE", b"\0\0\0\xff\xff\xff")
            + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


def lie_about_size(fmt: str, data: bytes, width: int, height: int) -> bytes:
    """``data`` with the header's width and height replaced (checksums fixed where a format has one)."""
    out = bytearray(data)
    try:
        if fmt == "PNG":
            out[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
            out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        elif fmt == "BMP":
            out[18:26] = struct.pack("<ii", _s32(width), _s32(height))
        elif fmt == "GIF":
            out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
            if len(out) > 20:  # the first image descriptor too, when it is right after a palette
                at = out.find(b"\x2c", 13)
                if at > 0 and at + 9 <= len(out):
                    out[at + 5 : at + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        elif fmt == "PPM":
            lines = bytes(out).split(b"\n", 2)
            if len(lines) == 3:
                return lines[0] + b"\n" + f"{width} {height}".encode() + b"\n" + lines[2]
        elif fmt == "JPEG":
            for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
                at = out.find(marker)
                if at > 0 and at + 9 <= len(out):
                    out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                    break
        elif fmt == "TIFF":
            _patch_tiff(out, width, height)
    except (struct.error, ValueError, IndexError):
        pass
    return bytes(out)


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _patch_tiff(out: bytearray, width: int, height: int) -> None:
    """Patch ImageWidth (256) and ImageLength (257) in the first IFD, in place."""
    endian = "<" if out[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", out[4:8])
    (count,) = struct.unpack(endian + "H", out[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack(endian + "HH", out[at : at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:  # SHORT
                out[at + 8 : at + 10] = struct.pack(endian + "H", value & 0xFFFF)
            else:
                out[at + 8 : at + 12] = struct.pack(endian + "I", value & 0xFFFFFFFF)


def odd_array(rng: np.random.Generator) -> np.ndarray:
    """A numpy array of a random dtype and a random (often invalid) shape."""
    dtype = np.dtype(rng.choice(ARRAY_DTYPES))
    ndim = int(rng.integers(0, 5))
    sides = [int(rng.choice([0, 1, 2, 3, 4, 5, 17, 64])) for _ in range(ndim)]
    if ndim >= 2 and rng.random() < 0.3:  # extreme aspect ratios
        sides[0], sides[1] = (1, int(rng.integers(1, 20000))) if rng.random() < 0.5 else (int(rng.integers(1, 20000)), 1)
    if ndim == 3 and rng.random() < 0.6:
        sides[2] = int(rng.choice([1, 3, 4]))
    shape = tuple(sides)
    if dtype.kind == "f":
        values = rng.normal(0.5, 2.0, shape)
        if values.size:
            values.flat[rng.integers(0, values.size, 3)] = rng.choice([np.nan, np.inf, -np.inf, 1e30], 3)
        return values.astype(dtype)
    if dtype.kind == "c":
        return (rng.random(shape) + 1j * rng.random(shape)).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


# ---------------------------------------------------------------------------- cases
def _any_real_file(rng: np.random.Generator, max_side: int = 96) -> tuple[str, bytes]:
    fmt, mode = savable()[int(rng.integers(len(savable())))]
    w, h = (int(rng.integers(1, max_side + 1)) for _ in range(2))
    return fmt, real_file(fmt, mode, w, h, int(rng.integers(2**31)), int(rng.integers(64)))


def _side(rng: np.random.Generator) -> int:
    return int(rng.choice(SPECIAL_SIDES)) if rng.random() < 0.5 else int(rng.integers(0, 3000))


def case_random_bytes(rng: np.random.Generator) -> Case:
    return Case("random_bytes", "random.png", rng.bytes(int(rng.integers(0, 4096))))


def case_magic_prefix(rng: np.random.Generator) -> Case:
    magic = list(MAGIC.values())[int(rng.integers(len(MAGIC)))]
    return Case("magic_prefix", "magic.png", magic + rng.bytes(int(rng.integers(0, 2048))))


def case_valid(rng: np.random.Generator) -> Case:
    fmt, data = _any_real_file(rng)
    return Case("valid_file", f"valid.{fmt.lower()}", data)


def case_truncated(rng: np.random.Generator) -> Case:
    fmt, data = _any_real_file(rng)
    return Case("truncated", f"truncated.{fmt.lower()}", truncate(data, int(rng.integers(0, len(data)))))


def case_corrupted(rng: np.random.Generator) -> Case:
    fmt, data = _any_real_file(rng)
    n = int(rng.integers(1, 9))
    # Half the edits land in the first 64 bytes, where headers and their lengths live.
    positions = [int(rng.integers(0, 64 if rng.random() < 0.5 else max(1, len(data)))) for _ in range(n)]
    edits = [(p, int(rng.integers(256))) for p in positions]
    return Case("corrupted", f"corrupted.{fmt.lower()}", corrupt(data, edits))


def case_lying_header(rng: np.random.Generator) -> Case:
    fmt, data = _any_real_file(rng)
    while fmt not in ("PNG", "BMP", "GIF", "PPM", "JPEG", "TIFF"):
        fmt, data = _any_real_file(rng)
    return Case("lying_header", f"lying.{fmt.lower()}", lie_about_size(fmt, data, _side(rng), _side(rng)))


def case_bomb(rng: np.random.Generator) -> Case:
    side = int(rng.choice([8001, 10000, 20000, 65535, 100000]))
    return Case("bomb", "bomb.png", png_bomb(side, int(rng.choice([side, 8001, 10000]))))


def case_extreme_size(rng: np.random.Generator) -> Case:
    fmt, mode = savable()[int(rng.integers(len(savable())))]
    long = int(rng.integers(1000, 30000))
    w, h = (1, long) if rng.random() < 0.5 else (long, 1)
    if rng.random() < 0.2:
        w, h = 1, 1
    return Case("extreme_size", f"extreme.{fmt.lower()}", real_file(fmt, mode, w, h, int(rng.integers(2**31))))


def case_pil_mode(rng: np.random.Generator) -> Case:
    mode = Image.MODES[int(rng.integers(len(Image.MODES)))]
    w, h = (int(rng.choice([1, 2, 3, 17, 64, 300])) for _ in range(2))
    return Case("pil_mode", f"<PIL {mode}>", random_image(rng, mode, w, h))


def case_array(rng: np.random.Generator) -> Case:
    arr = odd_array(rng)
    return Case("array", f"<array {arr.dtype} {arr.shape}>", arr)


#: Case kind -> generator; a case is drawn with probability proportional to the weight.
KINDS: dict[str, tuple[Callable[[np.random.Generator], Case], float]] = {
    "random_bytes": (case_random_bytes, 1.0),
    "magic_prefix": (case_magic_prefix, 1.0),
    "valid_file": (case_valid, 1.0),
    "truncated": (case_truncated, 2.0),
    "corrupted": (case_corrupted, 2.0),
    "lying_header": (case_lying_header, 1.5),
    "bomb": (case_bomb, 0.2),
    "extreme_size": (case_extreme_size, 0.3),
    "pil_mode": (case_pil_mode, 1.0),
    "array": (case_array, 1.0),
}


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the run seeded ``seed`` (independent of all other cases)."""
    rng = np.random.default_rng([seed, index])
    names = list(KINDS)
    weights = np.array([KINDS[k][1] for k in names])
    kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    return KINDS[kind][0](rng)


# ---------------------------------------------------------------------------- running
@dataclass
class Outcome:
    """What one target did with one case: ``scored``, ``refused`` (documented error) or ``crash``."""

    target: str
    status: str
    detail: str = ""
    warnings: list[str] = field(default_factory=list)  # categories of warnings raised (not crashes)


def check(case: Case, ctx: Context, targets: list[Target] | None = None) -> list[Outcome]:
    """Run ``case`` through every target that takes it, then predict on what decoded."""
    outcomes = []
    for target in targets or TARGETS:
        if not isinstance(case.payload, target.takes):
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image = target.run(case, ctx)
                if image is not None:
                    pred = ctx.detector.predict(image, full_resolution=True)[0]
                    if pred.anomaly_map.shape != image.shape[:2] or not np.isfinite(pred.score):
                        raise AssertionError(f"prediction of shape {pred.anomaly_map.shape} score {pred.score}")
                status, detail = "scored", ""
            except target.allowed as exc:
                status, detail = "refused", str(getattr(exc, "reason", exc))[:200]
            except Exception as exc:  # noqa: BLE001 - this is what is being counted
                status = "crash"
                detail = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=-3)[-600:]}"
        bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        if bombs and status != "crash":
            status, detail = "crash", f"DecompressionBombWarning escaped: {bombs[0].message}"
        outcomes.append(Outcome(target.name, status, detail, [w.category.__name__ for w in caught]))
    return outcomes


def tiny_detector(folder: Path) -> Any:
    """A detector small enough to score thousands of images on a CPU (64 px, 16 tokens)."""
    rng = np.random.default_rng(0)
    data = folder / "good"
    data.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = stmae.Config().override({
        "backbone.layers": "stride4,stride8", "features.image_size": 64, "features.grid_size": 8,
        "model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "model.decoder_dim": 32,
        "model.decoder_depth": 1, "model.decoder_heads": 2, "train.epochs": 2, "train.batch_size": 4,
        "train.warmup_epochs": 1, "train.device": "cpu", "infer.num_pairs": 2, "infer.sigma": 1.0,
    }).validate()
    return stmae.fit(data, folder / "run", cfg, quiet=True).detector


def run(cases: int, seed: int, max_seconds: float, only: int | None = None) -> dict[str, Any]:
    started = time.time()
    by_kind: dict[str, Counter] = defaultdict(Counter)
    by_target: dict[str, Counter] = defaultdict(Counter)
    crashes: list[dict[str, Any]] = []
    reasons: Counter = Counter()
    warned: Counter = Counter()
    done = 0
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(tiny_detector(Path(tmp) / "det"), Path(tmp))
        indices = [only] if only is not None else range(cases)
        for index in indices:
            if time.time() - started > max_seconds:
                break
            case = make_case(seed, index)
            for outcome in check(case, ctx):
                by_kind[case.kind][outcome.status] += 1
                by_target[outcome.target][outcome.status] += 1
                warned.update(set(outcome.warnings))
                if outcome.status == "refused":
                    reasons[outcome.detail.split(" (")[0][:60]] += 1
                if outcome.status == "crash":
                    crashes.append({"case": index, "kind": case.kind, "name": case.name, "target": outcome.target,
                                    "error": outcome.detail})
                    print(f"CRASH case {index} ({case.kind}) in {outcome.target}: {outcome.detail}", file=sys.stderr)
            by_kind[case.kind]["cases"] += 1
            done += 1
            if done % 500 == 0:
                print(f"{done} cases, {len(crashes)} crashes, {time.time() - started:.0f} s", flush=True)
    return {
        "what": "fuzzing of image decoding + Detector.predict and the service's /predict upload (benchmarks/fuzz.py)",
        "seed": seed,
        "cases_requested": cases,
        "cases_run": done,
        "stopped_by_time_limit": done < (1 if only is not None else cases),
        "max_seconds": max_seconds,
        "crashes": len(crashes),
        "crash_examples": crashes[:50],
        "crash_definition": "any exception other than stmae.data.DataError (incl. its subclass "
                            "UnreadableImageError) from decoding or predicting, a DecompressionBombWarning escaping, "
                            "or a 5xx answer from the HTTP service's /predict (a 4xx is a documented refusal)",
        "per_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "per_target": {k: dict(v) for k, v in sorted(by_target.items())},
        "top_refusal_reasons": dict(reasons.most_common(15)),
        "warnings_by_category": dict(warned.most_common()),  # (target, case) pairs that warned; not crashes
        "targets": [t.name for t in TARGETS],
        "savable_format_modes": [f"{fmt}/{mode}" for fmt, mode in savable()],
        "provenance": provenance.collect("cpu", started=started),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop early (the JSON says so)")
    parser.add_argument("--case", type=int, default=None, help="replay one case index (nothing written)")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    result = run(args.cases, args.seed, args.max_seconds, args.case)
    if args.case is None:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    print(json.dumps({k: result[k] for k in ("cases_run", "crashes", "per_target")}, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["crashes"] else 0)
