"""The prediction log (SQLite, real files): rows from ``stmae predict --log`` and the service,
paging and filters of ``GET /history``, schema checks, and a load that loses no row."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stmae.predlog import SCHEMA_VERSION, Entry, LogError, PredictionLog

from .conftest import noise_run_good_and_defect, write_png


def _entry(i: int, label: int = 0, model: str = "a", **kw) -> Entry:
    return Entry(source=f"img{i}.png", score=float(i), normalized=0.1 * i, label=label, threshold=2.5,
                 model=model, model_version=1, **kw)


def test_rows_are_written_by_the_writer_thread_and_read_back_with_filters(tmp_path):
    path = tmp_path / "log.sqlite"
    with PredictionLog(path) as log:
        log.record_many(_entry(i, label=int(i > 2), model="a" if i % 2 else "b", data=bytes([i])) for i in range(6))
        log.flush()
        total, rows = log.query()
        assert total == 6 and [r["source"] for r in rows] == [f"img{i}.png" for i in range(5, -1, -1)]  # newest first
        assert rows[-1]["sha256"] == hashlib.sha256(bytes([0])).hexdigest()
        assert log.query(label=1)[0] == 3 and log.query(model="a")[0] == 3
        assert log.query(model="a", label=1)[0] == 2  # img3, img5
        total, page = log.query(limit=2, offset=2)
        assert total == 6 and [r["source"] for r in page] == ["img3.png", "img2.png"]
        first = rows[-1]["time"]
        assert log.query(since=first)[0] == 6 and log.query(until=first)[0] == 0
        with pytest.raises(LogError, match="not an ISO 8601 time"):
            log.query(since="yesterday")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM stmae_log WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_a_log_of_a_newer_schema_or_another_file_is_refused(tmp_path):
    PredictionLog(tmp_path / "log.sqlite").close()
    conn = sqlite3.connect(tmp_path / "log.sqlite")
    conn.execute("UPDATE stmae_log SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(LogError, match="newer than this stmae"):
        PredictionLog(tmp_path / "log.sqlite")
    (tmp_path / "text.sqlite").write_text("not a database at all, just text " * 100)
    with pytest.raises(LogError, match="text.sqlite: not usable as a prediction log"):
        PredictionLog(tmp_path / "text.sqlite")


def test_many_threads_recording_lose_no_row(tmp_path):
    log = PredictionLog(tmp_path / "log.sqlite")

    def work(k: int) -> None:
        for i in range(200):
            log.record(_entry(i, model=f"m{k}"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()  # writes what is still queued
    reader = PredictionLog(tmp_path / "log.sqlite")
    assert reader.query()[0] == 1600 and reader.query(model="m3")[0] == 200
    reader.close()


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    return noise_run_good_and_defect(tmp_path_factory.mktemp("predlog"))


@pytest.mark.slow
def test_cli_predict_log_records_each_scored_image(noise_run, tmp_path):
    from .test_cli import run as cli

    run, good, defect = noise_run
    g, d = write_png(tmp_path / "in" / "good.png", good), write_png(tmp_path / "in" / "defect.png", defect)
    (tmp_path / "in" / "broken.png").write_bytes(b"nope")
    r = cli("predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--log", str(tmp_path / "p.sqlite"),
            "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    reader = PredictionLog(tmp_path / "p.sqlite")
    total, rows = reader.query()
    reader.close()
    assert total == 2  # the unreadable file is in skipped.csv, not in the log
    by_name = {Path(r["source"]).name: r for r in rows}
    assert by_name["defect.png"]["sha256"] == hashlib.sha256(d.read_bytes()).hexdigest()
    assert by_name["good.png"]["sha256"] == hashlib.sha256(g.read_bytes()).hexdigest()
    assert by_name["defect.png"]["label"] == 1 and by_name["defect.png"]["score"] > by_name["good.png"]["score"]
    assert all(r["model"] == run.name and r["model_version"] == 1 for r in rows)
    assert all(r["heatmap"] and Path(r["heatmap"]).is_file() for r in rows)


def test_service_logs_every_request_and_pages_through_history(noise_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from stmae.serve import create_app, load_model

    run, good, defect = noise_run

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    log = PredictionLog(tmp_path / "s.sqlite")
    with TestClient(create_app(load_model(run, device="cpu"), name="tiny", log=log)) as c:
        for _ in range(3):
            r = c.post("/predict", files=[("files", ("g.png", png(good), "image/png")), ("files", ("d.png", png(defect), "image/png"))])
            assert r.status_code == 200
        log.flush()
        h = c.get("/history").json()
        assert h["total"] == 6 and {row["source"] for row in h["rows"]} == {"g.png", "d.png"}
        assert c.get("/history", params={"label": 1}).json()["total"] == 3
        assert c.get("/history", params={"model": "other"}).json()["total"] == 0
        page = c.get("/history", params={"limit": 4, "offset": 4}).json()
        assert len(page["rows"]) == 2 and page["total"] == 6
        assert h["rows"][0]["sha256"] == hashlib.sha256(png(defect)).hexdigest()
        assert c.get("/history", params={"since": "soon"}).status_code == 422
        assert c.get("/history", params={"limit": 5000}).status_code == 422
    log.close()
    with TestClient(create_app(load_model(run, device="cpu"), name="tiny")) as c:
        r = c.get("/history")
        assert r.status_code == 404 and "--log" in json.loads(r.text)["detail"]


def test_a_log_of_schema_1_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE stmae_log (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO stmae_log VALUES ('schema_version', '1');
        CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, sha256 TEXT,
            source TEXT NOT NULL, score REAL NOT NULL, normalized REAL, label INTEGER NOT NULL, threshold REAL,
            model TEXT NOT NULL, model_version INTEGER NOT NULL, heatmap TEXT);
        INSERT INTO predictions (time, source, score, label, model, model_version)
            VALUES ('2026-12-07T08:00:00.000+00:00', 'old.png', 1.5, 0, 'a', 1);
    """)
    conn.commit()
    conn.close()
    with PredictionLog(path) as log:
        uid = log.record(_entry(7))
        log.flush()
        total, rows = log.query()
        assert total == 2 and rows[1]["source"] == "old.png" and rows[1]["uid"] is None and rows[0]["uid"] == uid
    assert sqlite3.connect(path).execute("SELECT value FROM stmae_log").fetchone()[0] == str(SCHEMA_VERSION)


def test_false_alarms_marked_on_the_service_are_folded_into_the_run(tmp_path):
    """The loop on a line: score, mark the false alarms good, update from the log, and the
    new appearance passes; defects still do not."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import stmae
    from stmae.serve import create_app, load_model
    from stmae.update import UpdateError, update_from_log

    from .conftest import make_tiny_category, tiny_config
    from .test_update import _stripes

    cat = make_tiny_category(tmp_path / "cat", n_train=12)
    run = stmae.fit(cat, tmp_path / "line", tiny_config(**{"infer.distance_weight": 1.0}), quiet=True).run_dir
    arrivals = _stripes(tmp_path / "arrivals", 16, seed=1)
    probes = _stripes(tmp_path / "probe", 6, seed=2)
    log = PredictionLog(tmp_path / "line.sqlite")  # keeps flagged uploads: those an operator may clear
    with TestClient(create_app(load_model(run, device="cpu"), name="line", log=log)) as c:
        results = []
        for path in arrivals:
            r = c.post("/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))])
            results += r.json()["results"]
        assert all(x["label"] == 1 and x["log_id"] for x in results)  # all false alarms
        for x in results:
            assert c.post("/feedback", json={"id": x["log_id"], "verdict": "good", "note": "new batch"}).status_code == 200
        assert c.post("/feedback", json={"id": "nope", "verdict": "good"}).status_code == 404
        assert c.post("/feedback", json={"id": results[0]["log_id"], "verdict": "fine"}).status_code == 422
    log.close()
    updated = update_from_log(run, tmp_path / "line.sqlite", device="cpu", quiet=True)
    assert updated.entry["images_added"] == 16 and updated.entry["version"] == 2
    after = stmae.load(run, device="cpu")
    assert all(p.label == 0 for p in after.predict(probes))
    defects = sorted((cat / "test" / "spot").glob("*.png"))
    assert all(p.label == 1 for p in after.predict(defects))
    with pytest.raises(UpdateError, match="no prediction of model 'line' is confirmed good and not yet folded"):
        update_from_log(run, tmp_path / "line.sqlite", device="cpu", quiet=True)  # each confirmation once


def test_the_service_updates_its_model_from_feedback_and_picks_up_new_versions(tmp_path):
    """POST /update folds the marked parts into the served run and serves the new version at
    once; a version written by `stmae update` from outside is picked up by the watcher."""
    pytest.importorskip("fastapi")
    import time

    from fastapi.testclient import TestClient

    import stmae
    from stmae.serve import create_app, load_model

    from .conftest import make_tiny_category, tiny_config
    from .test_update import _stripes

    cat = make_tiny_category(tmp_path / "cat", n_train=12)
    run = stmae.fit(cat, tmp_path / "line", tiny_config(**{"infer.distance_weight": 1.0}), quiet=True).run_dir
    arrivals, probe = _stripes(tmp_path / "arrivals", 16, seed=1), _stripes(tmp_path / "probe", 1, seed=2)[0]
    log = PredictionLog(tmp_path / "line.sqlite")

    def post(c, path: Path) -> dict:
        return c.post("/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))]).json()["results"][0]

    app = create_app(load_model(run, device="cpu"), name="line", log=log, source=run, device="cpu", watch_seconds=0.2)
    with TestClient(app) as c:
        assert c.post("/update").status_code == 422  # nothing marked yet: says so
        for path in arrivals:
            c.post("/feedback", json={"id": post(c, path)["log_id"], "verdict": "good"})
        assert post(c, probe)["label"] == 1
        r = c.post("/update")
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2 and c.get("/info").json()["model_version"] == 2
        assert post(c, probe)["label"] == 0  # the served model is the new version
        rows = c.get("/history", params={"limit": 1}).json()["rows"]
        assert rows[0]["model_version"] == 2
        # A version written from outside (the CLI) is served within a few polls.
        stmae.update(run, _stripes(tmp_path / "more", 3, seed=9), device="cpu", quiet=True)
        deadline = time.time() + 30
        while c.get("/info").json()["model_version"] != 3 and time.time() < deadline:
            time.sleep(0.2)
        assert c.get("/info").json()["model_version"] == 3
    log.close()
    with TestClient(create_app(load_model(run, device="cpu"), name="line")) as c:
        assert c.post("/update").status_code == 404  # no log, no source: nothing to update
