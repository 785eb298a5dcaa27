"""``stmae watch``: images scored as they land, with a real webhook receiver and a real
Mosquitto broker (started here, on loopback), both taken away and brought back mid-run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import stmae
from stmae.predlog import PredictionLog
from stmae.watch import JOURNAL, Watcher, WebhookSink

from .conftest import noise_run_good_and_defect, write_png

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    run, good, defect = noise_run_good_and_defect(tmp_path_factory.mktemp("watch"))
    return stmae.load(run, device="cpu"), run, good, defect


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_file_is_scored_once_and_only_after_it_stopped_growing(line, tmp_path):
    model, run, good, defect = line
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = write_png(tmp_path / "defect.png", defect).read_bytes()
    seen: list[dict] = []
    w = Watcher(model, inbox, model_path=run, settle=0.3, use_events=False, on_result=seen.append)
    target = inbox / "a.png"
    target.write_bytes(src[: len(src) // 2])  # the camera is still writing
    (inbox / "b.png.part").write_bytes(src)  # a copy tool's temporary name: never taken
    assert w.scan_once() == 0
    time.sleep(0.1)
    with open(target, "ab") as fh:
        fh.write(src[len(src) // 2:])
    assert w.scan_once() == 0  # changed since the last look: not settled
    time.sleep(0.4)
    w.scan_once()  # first look at the final size (scored here or at the next look)
    time.sleep(0.4)
    w.scan_once()
    assert [Path(m["path"]).name for m in seen] == ["a.png"] and seen[0]["label"] == 1 and seen[0]["error"] is None
    assert w.scan_once() == 0  # once
    w.close()
    # A restarted watcher skips what the journal lists; a file replaced under its name is new.
    again: list[dict] = []
    w2 = Watcher(model, inbox, model_path=run, settle=0.0, use_events=False, on_result=again.append)
    w2.scan_once(), w2.scan_once()
    assert again == []
    write_png(inbox / "a.png", good)
    w2.scan_once(), w2.scan_once()
    assert [m["label"] for m in again] == [0] and (inbox / JOURNAL).is_file()
    w2.close()


def test_results_are_sorted_logged_and_written_to_csv(line, tmp_path):
    model, run, good, defect = line
    inbox = tmp_path / "inbox"
    write_png(inbox / "good.png", good)
    write_png(inbox / "defect.png", defect)
    (inbox / "broken.png").write_bytes(b"not an image")
    log = PredictionLog(tmp_path / "log.sqlite")
    w = Watcher(model, inbox, model_path=run, log=log, csv_path=tmp_path / "results.csv", sort="move",
                settle=0.0, use_events=False)
    w.scan_once(), w.scan_once()
    w.close()
    log.flush()
    assert (inbox / "anomalous" / "defect.png").is_file() and (inbox / "good" / "good.png").is_file()
    assert (inbox / "broken.png").is_file()  # unreadable: left where it was, reported
    assert w.stats.scored == 2 and w.stats.flagged == 1 and w.stats.errors == 1
    total, rows = log.query()
    assert total == 2 and {Path(r["source"]).parent.name for r in rows} == {"good", "anomalous"}
    log.close()
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].startswith("time,path,score") and len(lines) == 4 and any("broken.png" in x and "error" not in x.split(",")[-1] for x in lines[1:])


class _Receiver:
    """A local webhook receiver that can fail on purpose or go away and come back."""

    def __init__(self, port: int) -> None:
        self.port, self.bodies, self.fail_next = port, [], 0
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.fail_next:
                    receiver.fail_next -= 1
                    self.send_response(500)
                else:
                    receiver.bodies.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


def test_webhook_messages_survive_errors_and_an_absent_receiver(line, tmp_path):
    model, run, good, defect = line
    port = _free_port()
    receiver = _Receiver(port)
    receiver.start()
    receiver.fail_next = 2  # the receiver answers 500 twice: retried
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", max_backoff=0.5).start()
    w = Watcher(model, inbox, model_path=run, sinks=[sink], settle=0.0, use_events=False)
    for i in range(2):
        write_png(inbox / f"{i}.png", defect if i else good)
    w.scan_once(), w.scan_once()
    assert _wait(lambda: len(receiver.bodies) == 2)
    receiver.stop()  # the receiver goes away; images keep arriving
    for i in range(2, 5):
        write_png(inbox / f"{i}.png", good)
    w.scan_once(), w.scan_once()
    time.sleep(1.0)
    assert len(receiver.bodies) == 2 and sink.delivered == 2  # the other three wait, queued
    receiver.start()  # back: everything arrives late, in order
    assert _wait(lambda: len(receiver.bodies) == 5)
    w.close()
    assert [Path(b["path"]).name for b in receiver.bodies] == [f"{i}.png" for i in range(5)]
    assert [b["label"] for b in receiver.bodies[:2]] == [0, 1] and all(b["model"] == run.name for b in receiver.bodies)
    assert w.stats.undelivered == {} and sink.failures >= 2
    receiver.stop()


class _Broker:
    """A real Mosquitto on loopback, with persistence so a restart keeps sessions."""

    def __init__(self, root: Path, port: int) -> None:
        self.port, self.root = port, root
        root.mkdir(parents=True, exist_ok=True)
        # Started as root, Mosquitto drops to its own user, which cannot write into pytest's
        # 0700 tmp folders: no persistence file, so a restart forgets the subscriber's
        # session and the test turns into a race. ``user root`` keeps it able to save.
        stay = "user root\n" if os.geteuid() == 0 else ""
        (root / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {root}/\nlog_dest none\n{stay}"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.root / "mosquitto.conf")])
        assert _wait(self._listening, 10), "mosquitto did not start"

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="no mosquitto (apt-get install mosquitto); .ci/run installs it")
def test_mqtt_messages_survive_the_broker_going_away(line, tmp_path):
    mqtt = pytest.importorskip("paho.mqtt.client")
    from stmae.watch import MqttSink

    model, run, good, defect = line
    port = _free_port()
    broker = _Broker(tmp_path / "broker", port)
    broker.start()
    got: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line-plc", clean_session=False)
    sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("line/results", qos=1)
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.reconnect_delay_set(1, 2)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sink = MqttSink(f"mqtt://127.0.0.1:{port}/line/results", max_backoff=1.0).start()
    w = Watcher(model, inbox, model_path=run, sinks=[sink], settle=0.0, use_events=False)
    try:
        write_png(inbox / "0.png", defect)
        w.scan_once(), w.scan_once()
        assert _wait(lambda: len(got) == 1)
        broker.kill()  # the broker goes away mid-run
        # it saved the subscriber's session, so what arrives while the subscriber reconnects waits
        assert (tmp_path / "broker" / "mosquitto.db").exists()
        for i in (1, 2):
            write_png(inbox / f"{i}.png", good)
        w.scan_once(), w.scan_once()
        assert w.stats.scored == 3  # scoring does not wait for the broker
        broker.start()
        assert _wait(lambda: len(got) >= 3, 60), (got, sink.delivered, sink.failures, sink.pending, sink._connected.is_set())
    finally:
        w.close()
        sub.loop_stop()
        sub.disconnect()
        if broker.proc and broker.proc.poll() is None:
            broker.kill()
    names = [Path(m["path"]).name for m in got]
    assert sorted(set(names)) == ["0.png", "1.png", "2.png"]  # QoS 1: at least once, none lost
    assert got[0]["label"] == 1 and w.stats.undelivered == {}


@pytest.mark.slow
def test_cli_watch_scores_what_lands_and_stops_on_ctrl_c(line, tmp_path):
    import signal
    import sys

    model, run, good, defect = line
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stmae.cli", "watch", str(run), str(inbox), "--csv", str(tmp_path / "r.csv"),
         "--settle", "0.2", "--poll", "0.2", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(3)
        write_png(tmp_path / "staging" / "d.png", defect)
        shutil.move(str(tmp_path / "staging" / "d.png"), inbox / "d.png")
        assert _wait(lambda: (tmp_path / "r.csv").exists() and len((tmp_path / "r.csv").read_text().splitlines()) == 2, 60)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "1 scored, 1 flagged" in out
