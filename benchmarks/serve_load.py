"""Load test of ``stmae serve``: 32 concurrent clients against the real HTTP stack.

Why: an inspection line has several cameras calling one service. This checks that under
that load every request is answered (errors must be 0), that answers stay correct (the same
image always gets the same score, whatever else is in flight), that ``/health`` keeps
answering while the worker is busy, and what latency (p50/p99) and throughput to expect.

What runs: the service (``stmae.serve.create_app`` on uvicorn, 127.0.0.1, a free port, in
this process) with ``--workers`` scoring threads; ``--clients`` threads, each with its own
HTTP connection, POST one image per request (``/predict``, with ``--heatmap`` also the heat
map) until ``--requests`` requests have been sent, then stop. A probe thread calls
``/health`` every 0.2 s meanwhile.

Model: ``--run RUN_DIR`` (with ``--images DIR`` for the images to send; default: noise
images at the model's input size), or, without ``--run``, the demo's texture set (smaller:
``--train-per-texture`` good crops per texture) and a model fitted on it with the ``demo``
preset for ``--epochs`` epochs, built in a temporary folder (``--workdir`` keeps it);
the images sent are then the set's test images, good and defective.

Run: ``nice python benchmarks/serve_load.py`` (about 3 minutes on a 2-core CPU, most of it
the fit); writes ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

import stmae
from stmae.data import list_images
from stmae.fileio import atomic_write_json
from stmae.provenance import collect
from stmae.serve import BackgroundServer, create_app, load_model

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "serve_load.json"


def build_demo_run(workdir: Path, epochs: int, train_per_texture: int, log: Any = print) -> tuple[Path, list[Path]]:
    """The demo's texture set (smaller) and a model fitted on it; returns (run folder, test images)."""
    from stmae.data.synthetic import DemoSpec, make_demo_dataset
    from stmae.demo import demo_config

    spec = DemoSpec(train_per_texture=train_per_texture, val_per_texture=max(4, train_per_texture // 4))
    root = make_demo_dataset(workdir, spec)
    cfg = demo_config(epochs=epochs, device="cpu")
    log(f"fitting the demo model ({3 * train_per_texture} training crops, {epochs} epochs) in {workdir} ...")
    started = time.perf_counter()
    stmae.fit(root, workdir / "run", cfg, val_data=root / "validation" / "good", quiet=True)
    log(f"  fitted in {time.perf_counter() - started:.0f} s")
    return workdir / "run", list_images(root / "test", recursive=True)


def noise_images(folder: Path, size: int, count: int = 8, seed: int = 0) -> list[Path]:
    """``count`` PNG noise textures of ``size`` x ``size`` (when no images are given)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"noise_{i:02d}.png"
        Image.fromarray(rng.integers(80, 170, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run_load(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int, heatmap: bool,
             timeout: float) -> dict[str, Any]:
    """``clients`` threads POST until ``requests`` are sent; latencies, statuses, scores per image."""
    lock = threading.Lock()
    next_ticket = [0]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    failures: list[str] = []
    scores: dict[str, set[float]] = {}
    query = "?heatmap=true" if heatmap else ""

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while True:
                with lock:
                    ticket = next_ticket[0]
                    if ticket >= requests:
                        return
                    next_ticket[0] += 1
                name, data = payloads[ticket % len(payloads)]
                started = time.perf_counter()
                try:
                    r = http.post("/predict" + query, files={"files": (name, data, "image/png")})
                    status = str(r.status_code)
                    body = r.json() if r.status_code == 200 else None
                except Exception as exc:  # a dropped connection is an error to count, not to crash on
                    status, body = type(exc).__name__, None
                    with lock:
                        failures.append(f"{name}: {exc}")
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
                    if body is not None:
                        scores.setdefault(name, set()).add(body["results"][0]["score"])
                    elif status.isdigit() and len(failures) < 20:
                        failures.append(f"{name}: HTTP {status}")

    health: list[float] = []
    health_errors = [0]
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    ok = http.get("/health").status_code == 200
                except Exception:
                    ok = False
                health.append(time.perf_counter() - started)
                health_errors[0] += 0 if ok else 1
                done.wait(0.2)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    prober = threading.Thread(target=probe, name="health-probe")
    started = time.perf_counter()
    prober.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done.set()
    prober.join()
    errors = sum(n for s, n in statuses.items() if s != "200")
    return {
        "requests": len(latencies),
        "errors": errors,
        "statuses": statuses,
        "failures": failures[:20],
        "wall_seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 3),
        "latency_ms": {
            "p50": round(1000 * percentile(latencies, 50), 1),
            "p90": round(1000 * percentile(latencies, 90), 1),
            "p99": round(1000 * percentile(latencies, 99), 1),
            "max": round(1000 * max(latencies), 1),
            "mean": round(1000 * statistics.fmean(latencies), 1),
        },
        "health_during_load": {
            "calls": len(health),
            "errors": health_errors[0],
            "p50_ms": round(1000 * percentile(health, 50), 1) if health else None,
            "p99_ms": round(1000 * percentile(health, 99), 1) if health else None,
        },
        # The same image must get the same score however many requests are in flight.
        "images_with_differing_scores": sum(len(s) > 1 for s in scores.values()),
        "distinct_images": len(payloads),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="Run folder to serve (default: build the demo model).")
    p.add_argument("--images", type=Path, help="Folder of images to send (with --run).")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=640)
    p.add_argument("--workers", type=int, default=1, help="Scoring threads of the service.")
    p.add_argument("--heatmap", action="store_true", help="Ask for heat maps too.")
    p.add_argument("--epochs", type=int, default=20, help="Epochs of the demo model (without --run).")
    p.add_argument("--train-per-texture", type=int, default=16, help="Good crops per texture (without --run).")
    p.add_argument("--workdir", type=Path, help="Keep the built data and run here (default: a temp folder).")
    p.add_argument("--timeout", type=float, default=300.0, help="Per-request client timeout, seconds.")
    p.add_argument("--out", type=Path, default=RESULTS_PATH)
    args = p.parse_args(argv)
    t0 = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="stmae_serve_load_") as tmp:
        work = args.workdir or Path(tmp)
        if args.run is None:
            run, images = build_demo_run(work, args.epochs, args.train_per_texture)
            source = f"built: demo textures ({3 * args.train_per_texture} good training crops), demo preset, {args.epochs} epochs"
        else:
            run, source = args.run, str(args.run)
            images = list_images(args.images, recursive=True) if args.images else []
        model = load_model(run, device="cpu")
        size = int(model.meta.get("image_size") or model.config.features.image_size)
        if not images:
            images = noise_images(work / "noise", size)
        payloads = [(f"{i:03d}_{path.name}", path.read_bytes()) for i, path in enumerate(images)]
        app = create_app(model, workers=args.workers, max_pending=max(64, 2 * args.clients))
        with BackgroundServer(app) as server:
            with httpx.Client(base_url=server.url, timeout=args.timeout) as http:  # warm-up, not counted
                for name, data in payloads[:4]:
                    http.post("/predict", files={"files": (name, data, "image/png")}).raise_for_status()
            print(f"{args.clients} clients, {args.requests} requests against {server.url} ...")
            load = run_load(server.url, payloads, args.clients, args.requests, args.heatmap, args.timeout)
    result = {
        "what": "stmae serve under load: concurrent clients POST one image per request to /predict",
        "model": {"source": source, "image_size": size, "engine": getattr(model, "engine", "torch")},
        "settings": {"clients": args.clients, "requests": args.requests, "workers": args.workers,
                     "heatmap": args.heatmap, "host": "127.0.0.1"},
        # Clients and service share this machine's cores (with anything else running on it).
        "load_average_before": load_before,
        **load,
        "provenance": collect("cpu", started=t0),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    lat = load["latency_ms"]
    print(f"{load['requests']} requests, {load['errors']} errors, {load['throughput_rps']:.1f} req/s; "
          f"latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms; /health p99 under load "
          f"{load['health_during_load']['p99_ms']} ms; wrote {args.out}")
    if load["errors"] or load["images_with_differing_scores"]:
        print("FAILED: errors or inconsistent scores under load", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
