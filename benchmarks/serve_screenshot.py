"""The screenshot of the inspection page in docs/serve.md (``docs/images/serve.png``).

Why a script: the picture in the docs should be what a user sees, made by the code at hand
and reproducible with one command. It builds the same demo model as ``serve_load.py`` (or
serves ``--run``), starts the service on 127.0.0.1, uploads a few of the demo's test images
(good and defective) through the page in headless Chromium (Debian's ``chromium``), sorts
the gallery by score and saves the page.

Run: ``python benchmarks/serve_screenshot.py [--run RUN --images DIR]`` (under a minute
on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "images" / "serve.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: Demo test images shown: two good crops and one of each defect type drawn on other textures.
PICKS = ("good/000.png", "good/010.png", "scratch/001.png", "hole/002.png", "stain/004.png", "foreign_object/000.png")


def chromium() -> str:
    path = os.environ.get("STMAE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise SystemExit(f"no Chromium at {path}: apt-get install chromium")
    return path


def screenshot(url: str, images: list[Path], out: Path, viewport: tuple[int, int] = (1280, 860)) -> None:
    """Upload ``images`` through the page at ``url``, sort by score (highest first), save ``out``."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.goto(url + "/")
            expect(page.locator("#status")).to_have_text("ready")
            page.set_input_files("#files", [str(i) for i in images])
            expect(page.locator("#gallery .card.pending")).to_have_count(0, timeout=120_000)
            expect(page.locator("#status")).to_have_text("ready")
            page.select_option("#sort", "desc")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="Run folder to serve (default: build the demo model).")
    p.add_argument("--images", type=Path, nargs="*", help="Images to upload (with --run).")
    p.add_argument("--workdir", type=Path, help="Keep the built demo data and run here.")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    spec = importlib.util.spec_from_file_location("serve_load", HERE / "serve_load.py")
    load = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = load
    spec.loader.exec_module(load)
    from stmae.serve import BackgroundServer, create_app, load_model

    with tempfile.TemporaryDirectory(prefix="stmae_serve_shot_") as tmp:
        work = args.workdir or Path(tmp)
        if args.run is None:
            run, _ = load.build_demo_run(work, epochs=20, train_per_texture=16)
            images = []
            for pick in PICKS:  # named after the defect type, as the page shows file names
                named = work / "upload" / pick.replace("/", "_")
                named.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(work / "textures" / "test" / pick, named)
                images.append(named)
        else:
            run, images = args.run, list(args.images or [])
        model = load_model(run, device="cpu")
        with BackgroundServer(create_app(model, name="demo textures")) as server:
            screenshot(server.url, images, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
