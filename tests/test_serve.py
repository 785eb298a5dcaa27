"""The HTTP service: scores, heat maps, threshold override, /info, /health, every bad upload.

One tiny detector is fitted per module (a few seconds) and served through FastAPI's
TestClient (the whole ASGI stack, in process).
"""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stmae
from stmae.scorer import Scorer
from stmae.report import overlay

from .conftest import noise_run_good_and_defect

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import httpx  # noqa: E402

from stmae.serve import BackgroundServer, create_app, decode_upload, load_model  # noqa: E402
from stmae.serve.decode import UploadError  # noqa: E402


def _png(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(run folder, good image, defect image): a tiny fit on noise textures, 4 held-out images."""
    return noise_run_good_and_defect(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def model(served):
    return load_model(served[0], device="cpu")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, name="tiny")) as c:
        yield c


def _post(client, *files, query: str = ""):
    return client.post("/predict" + query, files=[("files", f) for f in files])


def test_good_and_defect_scored_like_the_detector(client, served, model):
    run, good, defect = served
    r = _post(client, ("good.png", _png(good), "image/png"), ("defect.png", _png(defect), "image/png"))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["good.png", "defect.png"]
    assert results[1]["score"] > results[0]["score"]
    assert all(x["heatmap"] is None and (x["width"], x["height"]) == (64, 64) for x in results)
    # the same numbers as the library gives for the same pixels
    direct = stmae.load(run, device="cpu").predict([good, defect])
    assert [x["score"] for x in results] == pytest.approx([p.score for p in direct], rel=1e-5)
    t = model.threshold
    assert [x["threshold"] for x in results] == pytest.approx([t, t])
    assert [x["label"] for x in results] == [int(p.score > t) for p in direct]
    cal = model.calibration
    assert [x["normalized"] for x in results] == pytest.approx(list(cal.normalized([p.score for p in direct])))
    assert results[1]["label"] == 1 and results[1]["normalized"] == 1.0


def test_jpeg_grayscale_and_odd_sizes(client):
    rng = np.random.default_rng(1)
    gray = rng.integers(90, 160, (37, 50), dtype=np.uint8)
    r = _post(client, ("g.jpg", _jpeg(gray), "image/jpeg"), ("g.png", _png(gray), "application/octet-stream"))
    assert r.status_code == 200, r.text
    assert [(x["width"], x["height"]) for x in r.json()["results"]] == [(50, 37), (50, 37)]


def test_heatmap_is_the_map_over_the_image_as_png(client, served, model):
    _, _, defect = served
    r = _post(client, ("defect.png", _png(defect), "image/png"), query="?heatmap=true")
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["heatmap"]))))
    assert heat.shape == (64, 64, 3) and heat.dtype == np.uint8
    amap = model.predict([defect])[0].anomaly_map
    assert amap[20:34, 24:40].mean() > 2 * np.delete(amap, np.s_[14:40], axis=0).mean()  # the map sees the defect
    np.testing.assert_array_equal(heat, overlay(defect, amap, model.calibration.pixel_threshold))


def test_large_image_heatmap_is_capped(client):
    big = np.random.default_rng(2).integers(90, 160, (300, 1200, 3), dtype=np.uint8)
    r = _post(client, ("wide.png", _png(big), "image/png"), query="?heatmap=true")
    assert r.status_code == 200, r.text
    heat = Image.open(io.BytesIO(base64.b64decode(r.json()["results"][0]["heatmap"])))
    assert heat.size == (512, 128)


def test_threshold_override_changes_labels(client, served):
    _, good, defect = served
    files = (("good.png", _png(good), "image/png"), ("defect.png", _png(defect), "image/png"))
    base = _post(client, *files).json()["results"]
    low = min(x["score"] for x in base) - 1.0
    high = max(x["score"] for x in base) + 1.0
    between = (base[0]["score"] + base[1]["score"]) / 2
    for t, labels in ((low, [1, 1]), (high, [0, 0]), (between, [0, 1])):
        got = _post(client, *files, query=f"?threshold={t}").json()["results"]
        assert [x["label"] for x in got] == labels
        assert [x["threshold"] for x in got] == pytest.approx([t, t])
        assert [x["score"] for x in got] == [x["score"] for x in base]  # scores do not move
    # the model's own threshold is untouched by an override
    assert _post(client, *files).json()["results"][0]["threshold"] == base[0]["threshold"]


def test_info_and_health(client, model, served):
    info = client.get("/info").json()
    meta = json.loads((served[0] / "meta.json").read_text())
    assert info["name"] == "tiny" and info["engine"] == "torch"
    assert info["image_size"] == 64 and info["threshold"] == pytest.approx(meta["calibration"]["image_threshold"])
    assert info["calibration"]["center"] == pytest.approx(float(np.median(meta["calibration_scores"]["all"])))
    assert info["calibration"]["n_images"] == meta["n_val"] == 4
    assert info["config"]["features"]["grid_size"] == 8
    assert info["meta"]["n_train"] == 6 and "data" not in info["meta"] and "val_images" not in info["meta"]
    assert info["stmae_version"] == stmae.__version__
    assert info["limits"] == {"max_request_bytes": 32 * 1024 * 1024, "max_pixels": 40_000_000, "max_files": 64}
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["pending"] == 0 and health["workers"] == 1


def test_page_docs_and_schema_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="threshold"' in page.text
    for asset in ("app.js", "style.css", "docs.js", "docs.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "static/docs.js" in docs.text
    for text in (page.text, docs.text, client.get("/static/app.js").text, client.get("/static/docs.js").text):
        assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/info"} <= set(schema["paths"])
    params = {p["name"] for p in schema["paths"]["/predict"]["post"]["parameters"]}
    assert params == {"threshold", "heatmap"}


def _bomb_png() -> bytes:
    """20000 x 20000 palette PNG: 400 megapixels in about 50 KB."""
    buf = io.BytesIO()
    Image.new("P", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("no files", 400, "no files"),
        ("not multipart", 400, "no files"),
        ("malformed multipart", 400, "multipart"),
        ("empty file", 422, "empty"),
        ("text named .png", 415, "not a supported image"),
        ("truncated png", 422, "cannot decode"),
        ("wrong content type", 415, "content type 'text/plain'"),
        ("decompression bomb", 413, "decompression bomb"),
        ("bad threshold", 422, "threshold"),
        ("infinite threshold", 422, "finite"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_message(client, served, case, status, words):
    good = _png(served[1])
    if case == "no files":
        r = client.post("/predict")
    elif case == "not multipart":
        r = client.post("/predict", json={"path": "/etc/passwd"})
    elif case == "malformed multipart":
        r = client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"})
    elif case == "empty file":
        r = _post(client, ("e.png", b"", "image/png"))
    elif case == "text named .png":
        r = _post(client, ("t.png", b"this is text, not a picture", "image/png"))
    elif case == "truncated png":
        r = _post(client, ("cut.png", good[: len(good) // 2], "image/png"))
    elif case == "wrong content type":
        r = _post(client, ("g.png", good, "text/plain"))
    elif case == "decompression bomb":
        r = _post(client, ("bomb.png", _bomb_png(), "image/png"))
    elif case == "bad threshold":
        r = _post(client, ("g.png", good, "image/png"), query="?threshold=high")
    else:
        r = _post(client, ("g.png", good, "image/png"), query="?threshold=inf")
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"  # still alive after it


def test_one_bad_file_names_itself_and_fails_the_request(client, served):
    r = _post(client, ("ok.png", _png(served[1]), "image/png"), ("broken.png", b"\x89PNG\r\n\x1a\nxx", "image/png"))
    assert r.status_code == 422 and r.json()["detail"].startswith("broken.png:")


def test_pixel_limit_is_checked_from_the_header(model, served):
    with TestClient(create_app(model, max_pixels=1000)) as c:
        ok = _post(c, ("small.png", _png(served[1][:25, :40]), "image/png"))  # exactly 1000 pixels
        assert ok.status_code == 200, ok.text
        r = _post(c, ("big.png", _png(served[1][:40, :40]), "image/png"))
        assert r.status_code == 413
        assert r.json()["detail"].startswith("big.png: refused before decoding: 40x40 = 1,600 pixels, over the limit of 1,000")


def test_request_size_limit_declared_and_streamed(model, served):
    with TestClient(create_app(model, max_request_bytes=2000)) as c:
        big = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # incompressible
        r = _post(c, ("big.png", _png(big), "image/png"))
        assert r.status_code == 413 and "limit of 2,000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b"--zz\r\n"
            for _ in range(10):
                yield b"x" * 500

        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413 and "limit of 2,000 bytes" in r.json()["detail"]
        assert c.get("/health").status_code == 200


def test_too_many_files(model, served):
    with TestClient(create_app(model, max_files=2)) as c:
        f = ("g.png", _png(served[1]), "image/png")
        assert _post(c, f, f).status_code == 200
        r = _post(c, f, f, f)
        assert r.status_code == 413 and "at most 2" in r.json()["detail"]


def test_filenames_are_never_paths(client, served):
    r = _post(client, ("../../etc/passwd.png", _png(served[1]), "image/png"))
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "passwd.png"


class _OtherEngine(Scorer):
    """Another engine (as a torch-free runtime is): any Scorer subclass, scoring with the
    torch Detector's batch step. The service needs nothing else from it."""

    engine = "stream-test"

    def __init__(self, detector):
        self.detector, self.meta, self.calibration = detector, detector.meta, detector.calibration

    image_size = property(lambda self: self.detector.image_size)
    batch_size = property(lambda self: self.detector.batch_size)

    def score_uint8(self, batch):
        return self.detector.score_uint8(batch)


def test_streaming_engine_is_served_through_the_same_api(model, served):
    _, good, defect = served
    with TestClient(create_app(_OtherEngine(model))) as c:
        r = _post(c, ("g.png", _png(good), "image/png"), ("d.png", _png(defect), "image/png"), query="?threshold=1e9")
        assert r.status_code == 200, r.text
        direct = model.predict([good, defect], threshold=1e9)
        assert [x["score"] for x in r.json()["results"]] == pytest.approx([p.score for p in direct], rel=1e-5, abs=1e-5)  # batch composition moves the last float bits: ~2e-6 on the good image's score of about -0.1, against a threshold of about 1
        assert [x["label"] for x in r.json()["results"]] == [0, 0]
        assert c.get("/info").json()["engine"] == "stream-test"
    with pytest.raises(TypeError, match="cannot be served"):
        create_app(object())


class _Gate(_OtherEngine):
    """The tiny model behind a gate: scoring waits until released; an all-black image raises."""

    def __init__(self, model):
        super().__init__(model)
        self.entered, self.release = threading.Event(), threading.Event()

    def score_uint8(self, batch):
        self.entered.set()
        assert self.release.wait(60)
        if not batch[0].any():
            raise RuntimeError("model failure on a black image")
        return super().score_uint8(batch)


def test_slow_and_failing_requests_do_not_block_or_kill_the_service(model, served):
    gate = _Gate(model)
    png = _png(served[1])
    answers = {}
    with BackgroundServer(create_app(gate, max_pending=1)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        slow = threading.Thread(target=lambda: answers.update(slow=http.post("/predict", files={"files": ("a.png", png)})))
        slow.start()
        assert gate.entered.wait(30)
        health = http.get("/health", timeout=5)  # answered while the worker is busy
        assert health.status_code == 200 and health.json()["pending"] == 1
        busy = http.post("/predict", files={"files": ("b.png", png)})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
        gate.release.set()
        slow.join(60)
        assert answers["slow"].status_code == 200
        black = http.post("/predict", files={"files": ("black.png", _png(np.zeros((8, 8, 3), np.uint8)))})
        assert black.status_code == 500
        assert black.json()["detail"] == "internal error while handling the request (RuntimeError: model failure on a black image)"
        after = http.post("/predict", files={"files": ("c.png", png)})
        assert after.status_code == 200 and http.get("/health").json() == {"status": "ok", "pending": 0, "served": 3, "workers": 1}


def test_invalid_settings_and_missing_model(model, tmp_path):
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        create_app(model, max_pixels=0)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        load_model(tmp_path / "nope")


def test_decoder_bomb_refused_before_decoding():
    with pytest.raises(UploadError) as err:
        decode_upload(_bomb_png(), "bomb.png", max_pixels=40_000_000)  # the service's default limit
    assert err.value.status == 413
    medium = io.BytesIO()
    Image.new("P", (4000, 3000)).save(medium, format="PNG")
    with pytest.raises(UploadError, match="4000x3000 = 12,000,000 pixels") as err:
        decode_upload(medium.getvalue(), "m.png", max_pixels=1_000_000)
    assert err.value.status == 413


def test_cli_serve_is_wired(monkeypatch, served):
    """``stmae serve RUN --port ...`` loads the model once and hands the app to uvicorn."""
    import uvicorn
    from typer.testing import CliRunner

    from stmae.cli import app

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    out = CliRunner().invoke(app, ["serve", str(served[0]), "--port", "8123", "--max-pixels", "5000", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    with TestClient(seen["app"]) as c:
        assert c.get("/info").json()["limits"]["max_pixels"] == 5000
    bad = CliRunner().invoke(app, ["serve", str(Path(served[0]) / "missing")])
    assert bad.exit_code == 2 and "no such run folder" in bad.output


# ---------------------------------------------------------------------------- fuzzing
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def real_files(served):
    _, good, _ = served
    return {"png": _png(good), "jpeg": _jpeg(good), "gray png": _png(good[:, :, 0])}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_uploads_never_get_a_5xx(client, real_files, data):
    """Random bytes and corrupted real PNG/JPEG files: a 200 or a 4xx with a message, never a 5xx."""
    kind = data.draw(st.sampled_from(["random", "png", "jpeg", "gray png"]), label="kind")
    if kind == "random":
        blob = data.draw(st.binary(max_size=3000), label="bytes")
    else:
        blob = bytearray(real_files[kind])
        for _ in range(data.draw(st.integers(0, 4), label="flips")):  # corrupt bytes anywhere
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))), label="cut")  # maybe truncate
        blob = bytes(blob[:cut])
    ctype = data.draw(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain"]))
    r = _post(client, ("fuzz.png", blob, ctype), query="?heatmap=true" if data.draw(st.booleans()) else "")
    hypothesis.event(f"HTTP {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert 400 <= r.status_code < 500 and r.json()["detail"].startswith("fuzz.png: ")
