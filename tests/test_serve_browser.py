"""The inspection page in a real browser: Playwright drives Debian's headless Chromium.

The service runs on uvicorn (127.0.0.1, a free port) in a background thread; the page is
loaded from it, an image is uploaded through the file input, and the verdict, the score
and the heat map must appear; moving the threshold slider must flip the verdict without
another request. Playwright's own browser download cannot work offline, so the system
``chromium`` is used (``apt-get install chromium``; ``.ci/run`` installs it). Without it
the test skips, except in CI (``CI=true``), where it must run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import fit_noise_run, load_benchmark, write_png

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from stmae.serve import BackgroundServer, create_app, load_model  # noqa: E402

CHROMIUM = os.environ.get("STMAE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists() and os.environ.get("CI", "").lower() != "true":
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); required in CI", allow_module_level=True)


def launch(playwright):
    """Headless system Chromium (never Playwright's downloaded build)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    run, rng = fit_noise_run(root)
    defect = rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)
    defect[20:34, 24:40] = (250, 20, 20)
    path = write_png(root / "upload" / "defect.png", defect)
    model = load_model(run, device="cpu")
    with BackgroundServer(create_app(model, name="tiny")) as srv:
        yield srv, path, model


def test_upload_shows_verdict_score_heatmap_and_slider_relabels(server):
    srv, image, model = server
    expected = model.predict([np.asarray(Image.open(image))])[0]
    requests = []
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(srv.url + "/")
            sync_api.expect(page.locator("#status")).to_have_text("ready")
            sync_api.expect(page.locator("#info")).to_contain_text("efficientnet_lite0")

            page.set_input_files("#files", str(image))
            card = page.locator("#gallery .card").first
            sync_api.expect(card).to_have_attribute("data-score", str(expected.score), timeout=30_000)
            assert expected.score > model.threshold  # the drawn defect is flagged by the model
            sync_api.expect(card.locator(".verdict")).to_have_text("ANOMALOUS")
            sync_api.expect(card.locator(".score")).to_contain_text(f"score {expected.score:.4g}")
            heat = card.locator("img.heatmap")
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            assert heat.evaluate("img => img.complete && img.naturalWidth") == 64  # decoded by the browser
            fill = card.locator(".fill").evaluate("e => e.style.width")
            assert fill.endswith("%") and float(fill[:-1]) > 0

            # Slider above the score: the same card turns GOOD without any new /predict call.
            posts = sum("/predict" in u for u in requests)
            page.locator("#threshold").fill(str(expected.score * 1.05))
            sync_api.expect(card.locator(".verdict")).to_have_text("GOOD")
            sync_api.expect(page.locator("#summary")).to_have_text("1 scored, 0 anomalous")
            page.locator("#reset-threshold").click()
            sync_api.expect(card.locator(".verdict")).to_have_text("ANOMALOUS")
            assert sum("/predict" in u for u in requests) == posts == 1
            assert all(u.startswith(srv.url) or u.startswith("data:") or u.startswith("blob:") for u in requests)
        finally:
            browser.close()


def test_bad_file_shows_the_service_message(server, tmp_path):
    srv, _, _ = server
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            sync_api.expect(page.locator("#status")).to_have_text("ready")
            page.set_input_files("#files", str(text))
            card = page.locator("#gallery .card").first
            sync_api.expect(card).to_have_class("card failed")
            sync_api.expect(card.locator(".error")).to_contain_text("notes.png: not a supported image")
        finally:
            browser.close()


def test_docs_page_renders_the_schema_offline(server):
    srv, _, _ = server
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            schema = json.loads(urllib.request.urlopen(srv.url + "/openapi.json", timeout=10).read())
            operations = [(path, verb) for path, verbs in schema["paths"].items() for verb in verbs]
            assert len(operations) >= 6  # predict, feedback, history, update, health, info
            page.goto(srv.url + "/docs")
            # one rendered block per operation the schema lists, whatever endpoints are added
            sync_api.expect(page.locator("#operations .op")).to_have_count(len(operations))
            for path in ("/predict", "/feedback", "/history", "/update", "/health", "/info"):
                sync_api.expect(page.locator("#operations")).to_contain_text(path)
            sync_api.expect(page.locator("#operations")).to_contain_text("threshold")
        finally:
            browser.close()


def test_docs_screenshot_script_shoots_the_scored_page(server, tmp_path):
    """benchmarks/serve_screenshot.py (the docs picture) uploads, waits for the scores and saves."""
    srv, image, _ = server
    out = tmp_path / "shot.png"
    load_benchmark("serve_screenshot").screenshot(srv.url, [image], out, viewport=(900, 600))
    shot = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"))
    assert shot.shape == (600, 900, 3)
    assert (np.abs(shot.astype(int) - (192, 38, 45)).sum(axis=2) < 30).any()  # the red ANOMALOUS colour is on it


def test_feedback_buttons_store_the_verdict_in_the_log(tmp_path):
    """With a prediction log, each scored card offers "good part" / "defect"; a click stores
    the verdict for that very prediction (read back from the SQLite file)."""
    from stmae.predlog import PredictionLog

    run, rng = fit_noise_run(tmp_path)
    defect = rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)
    defect[20:34, 24:40] = (250, 20, 20)
    image = write_png(tmp_path / "upload" / "flagged.png", defect)
    log = PredictionLog(tmp_path / "log.sqlite")
    app = create_app(load_model(run, device="cpu"), name="tiny", log=log, source=run, device="cpu")
    with BackgroundServer(app) as srv, sync_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            sync_api.expect(page.locator("#status")).to_have_text("ready")
            page.set_input_files("#files", str(image))
            card = page.locator("#gallery .card").first
            sync_api.expect(card.locator(".verdict")).to_have_text("ANOMALOUS", timeout=30_000)
            card.locator("button.mark-good").click()
            sync_api.expect(card.locator(".marked")).to_have_text("marked good part")
            sync_api.expect(card).to_have_attribute("data-feedback", "good")
            rows = log.confirmed("good", model="tiny")
            assert [r["source"] for r in rows] == ["flagged.png"] and Path(rows[0]["image"]).is_file()
            # The page's update button folds it into the served model, which is served at once.
            page.locator("#update-model").click()
            sync_api.expect(page.locator("#update-status")).to_contain_text("now serving version 2", timeout=60_000)
            sync_api.expect(page.locator("#info")).to_contain_text("model version2")
        finally:
            browser.close()
    assert log.confirmed("good", model="tiny") == []  # folded in, once
    log.close()
