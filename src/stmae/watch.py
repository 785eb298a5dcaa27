"""Scoring images as they land in a folder, with results sent to the line.

Why: camera software on a line usually drops each frame into a folder and expects an
answer elsewhere (a PLC listening on MQTT, a MES taking webhooks). ``stmae watch`` is that
glue: it scores every new image once, records it (prediction log, CSV), optionally sorts
the file into ``good/`` and ``anomalous/``, and sends one message per image to each sink.

What it guarantees:

- **Never a half-written file.** A file is scored only after its size and modification
  time have stayed the same for ``settle`` seconds (names starting with ``.`` or ending in
  ``.part``/``.tmp``/``.crdownload`` are never taken: copy tools write those first).
- **Each image once, across restarts.** Scored names are appended to a journal
  (``INBOX/.stmae-watch.journal``) before their results are sent; a restarted watcher skips
  them. A file replaced under the same name (new size or time) is scored again.
- **Nothing lost when a sink goes away.** Each sink has its own queue and thread, retries
  with exponential backoff (capped at ``max_backoff`` seconds) and delivers late, in order,
  once it is back. A watcher that is stopped delivers what it can within ``drain`` seconds
  and reports what is left.

Events come from watchdog where it is installed (``stmae[line]``); polling every ``poll``
seconds always runs as well, so filesystems without events (network shares) work too.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from .data.io import IMAGE_EXTENSIONS
from .fileio import csv_cell
from .predlog import Entry, PredictionLog, model_identity, now
from .prediction import Skipped
from .scorer import Scorer

JOURNAL = ".stmae-watch.journal"
SORT_MODES = ("move", "link")
_PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")
CSV_COLUMNS = ("time", "path", "score", "normalized", "label", "threshold", "model", "model_version", "error")


class Sink:
    """A destination for one JSON message per scored image, delivered by its own thread,
    in order, retried with backoff until it gets through."""

    name = "sink"

    def __init__(self, max_backoff: float = 30.0) -> None:
        self.max_backoff = max_backoff
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.delivered = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._loop, name=f"stmae-{self.name}", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> "Sink":
        self._thread.start()
        return self

    def send(self, message: dict[str, Any]) -> None:
        self._queue.put(message)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def deliver(self, message: dict[str, Any]) -> None:  # pragma: no cover - abstract
        """Deliver one message or raise (any exception means: retry later)."""
        raise NotImplementedError

    def close(self, drain: float = 10.0) -> int:
        """Deliver what is queued within ``drain`` seconds; returns how many are left."""
        deadline = time.monotonic() + drain
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        left = max(0, self._queue.unfinished_tasks - 1)  # the stop marker is not a message
        self._shutdown()
        return left

    def _shutdown(self) -> None:
        pass

    def _loop(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                self._queue.task_done()
                return
            backoff = 0.2
            while True:
                try:
                    self.deliver(message)
                    self.delivered += 1
                    break
                except Exception:  # the sink is away: wait and try again, never drop
                    self.failures += 1
                    if self._stopping.wait(backoff):
                        return  # stopped while the sink is away: the message stays counted as left
                    backoff = min(self.max_backoff, backoff * 2)
            self._queue.task_done()


class WebhookSink(Sink):
    """HTTP POST of each message as JSON to ``url``; any 2xx answer counts as delivered."""

    name = "webhook"

    def __init__(self, url: str, timeout: float = 10.0, **kw: Any) -> None:
        if urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"--webhook must be an http:// or https:// URL, got {url!r}")
        super().__init__(**kw)
        self.url, self.timeout = url, timeout

    def deliver(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode("utf-8")
        req = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as res:  # raises on 4xx/5xx
            if not 200 <= res.status < 300:
                raise urllib.error.HTTPError(self.url, res.status, "not 2xx", res.headers, None)


class MqttSink(Sink):
    """Each message published as JSON to ``mqtt://host:port/topic`` with QoS 1 (paho-mqtt);
    a message counts as delivered once the broker has acknowledged it."""

    name = "mqtt"

    def __init__(self, url: str, timeout: float = 10.0, **kw: Any) -> None:
        parsed = urlparse(url)
        topic = parsed.path.lstrip("/")
        if parsed.scheme != "mqtt" or not parsed.hostname or not topic:
            raise ValueError(f"--mqtt must look like mqtt://host:port/topic, got {url!r}")
        try:
            import paho.mqtt.client as mqtt
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "--mqtt needs paho-mqtt: pip install 'stmae[line]' (or pip install paho-mqtt)"
            ) from None
        super().__init__(**kw)
        self.topic, self.timeout = topic, timeout
        self._connected = threading.Event()
        # A persistent session: the broker and the client agree on the QoS 1 messages in flight
        # across a reconnect, so one acknowledged is one the broker will deliver.
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"stmae-watch-{os.getpid()}-{id(self)}",
                                   clean_session=False)
        self._client.reconnect_delay_set(min_delay=1, max_delay=int(self.max_backoff))
        self._client.on_connect = lambda c, u, f, rc, p=None: self._connected.set() if not rc.is_failure else None
        self._client.on_disconnect = lambda *a, **k: self._connected.clear()
        self._client.connect_async(parsed.hostname, parsed.port or 1883)
        self._client.loop_start()

    def deliver(self, message: dict[str, Any]) -> None:
        if not self._connected.wait(self.timeout):
            raise ConnectionError("not connected to the MQTT broker")
        info = self._client.publish(self.topic, json.dumps(message), qos=1)
        info.wait_for_publish(timeout=self.timeout)
        if not info.is_published():
            raise ConnectionError("the broker did not acknowledge the message")

    def _shutdown(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def make_sinks(webhooks: Iterable[str] = (), mqtts: Iterable[str] = (), max_backoff: float = 30.0) -> list[Sink]:
    """Sinks for the given URLs, started."""
    sinks: list[Sink] = [WebhookSink(u, max_backoff=max_backoff) for u in webhooks]
    sinks += [MqttSink(u, max_backoff=max_backoff) for u in mqtts]
    return [s.start() for s in sinks]


@dataclass
class WatchStats:
    """What a watcher has done so far."""

    scored: int = 0
    flagged: int = 0
    errors: int = 0
    undelivered: dict[str, int] = field(default_factory=dict)


class Watcher:
    """Scores new images in ``inbox`` with ``model`` (see the module docstring).

    ``run()`` blocks until :meth:`stop` (or, with ``until``, until it returns True);
    ``scan_once()`` does one pass, for tests and cron-style use.
    """

    def __init__(
        self,
        model: Scorer,
        inbox: str | os.PathLike,
        *,
        model_path: str | os.PathLike | None = None,
        log: PredictionLog | None = None,
        csv_path: str | os.PathLike | None = None,
        sort: str | None = None,
        sinks: Iterable[Sink] = (),
        settle: float = 1.0,
        poll: float = 1.0,
        use_events: bool = True,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model, self.inbox = model, Path(inbox)
        if not self.inbox.is_dir():
            raise FileNotFoundError(f"{self.inbox}: no such folder to watch")
        if sort is not None and sort not in SORT_MODES:
            raise ValueError(f"sort must be one of {SORT_MODES} or None, got {sort!r}")
        self.identity = model_identity(model, model_path)
        self.log, self.sort, self.sinks = log, sort, list(sinks)
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.settle, self.poll, self.on_result = settle, poll, on_result
        self.stats = WatchStats()
        self._journal_path = self.inbox / JOURNAL
        self._done = self._read_journal()
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen unchanged)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer = self._start_events() if use_events else None

    # ------------------------------------------------------------------ journal
    def _read_journal(self) -> set[tuple[str, int, int]]:
        done: set[tuple[str, int, int]] = set()
        if self._journal_path.is_file():
            for line in self._journal_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    done.add((rec["name"], int(rec["size"]), int(rec["mtime_ns"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash: that file is scored again
        return done

    def _journal(self, key: tuple[str, int, int]) -> None:
        with open(self._journal_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"name": key[0], "size": key[1], "mtime_ns": key[2], "time": now()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._done.add(key)

    # ------------------------------------------------------------------ finding files
    def _start_events(self) -> Any:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ModuleNotFoundError:
            return None
        wake = self._wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        observer = Observer()
        observer.schedule(Wake(), str(self.inbox), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    def ready_files(self) -> list[Path]:
        """Image files in the inbox whose size and time stood still for ``settle`` seconds
        and that were not scored before (oldest first)."""
        ready, clock = [], time.monotonic()
        present = set()
        for entry in sorted(os.scandir(self.inbox), key=lambda e: e.name):
            name = entry.name
            if (not entry.is_file() or name.startswith(".") or name.lower().endswith(_PARTIAL_SUFFIXES)
                    or Path(name).suffix.lower() not in IMAGE_EXTENSIONS):
                continue
            st = entry.stat()
            present.add(name)
            if (name, st.st_size, st.st_mtime_ns) in self._done:
                continue
            before = self._seen.get(name)
            if before is None or before[:2] != (st.st_size, st.st_mtime_ns):
                self._seen[name] = (st.st_size, st.st_mtime_ns, clock)
                continue
            if st.st_size > 0 and clock - before[2] >= self.settle:
                ready.append(Path(entry.path))
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return ready

    # ------------------------------------------------------------------ scoring
    def scan_once(self) -> int:
        """Score what is ready; returns how many files were handled."""
        files = self.ready_files()
        if not files:
            return 0
        for path, pred in zip(files, self.model.iter_predict([str(p) for p in files], on_error="skip", quiet=True)):
            self._handle(path, pred)
        return len(files)

    def _handle(self, path: Path, pred: Any) -> None:
        st = path.stat()
        key = (path.name, st.st_size, st.st_mtime_ns)
        name, version = self.identity
        message: dict[str, Any] = {"time": now(), "path": str(path), "model": name, "model_version": version}
        if isinstance(pred, Skipped):
            message.update(score=None, normalized=None, label=None, threshold=None, error=pred.reason)
            self.stats.errors += 1
        else:
            message.update(score=float(pred.score), normalized=None if pred.normalized is None else float(pred.normalized),
                           label=int(pred.label), threshold=None if pred.threshold is None else float(pred.threshold),
                           error=None)
            self.stats.scored += 1
            self.stats.flagged += int(pred.label == 1)
        if self.sort is not None and message["error"] is None:
            message["path"] = str(self._sort(path, message["label"]))
        if self.log is not None and message["error"] is None:
            self.log.record(Entry(source=message["path"], score=message["score"], normalized=message["normalized"],
                                  label=message["label"], threshold=message["threshold"], model=name,
                                  model_version=version, path=message["path"]))
        if self.csv_path is not None:
            self._append_csv(message)
        self._journal(key)  # before the sinks: a restart never scores it twice
        for sink in self.sinks:
            sink.send(message)
        if self.on_result is not None:
            self.on_result(message)

    def _sort(self, path: Path, label: int) -> Path:
        folder = self.inbox / ("anomalous" if label == 1 else "good")
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        if self.sort == "move":
            os.replace(path, target)
        else:
            if target.exists():
                target.unlink()
            try:
                os.link(path, target)
            except OSError:  # another filesystem: a copy
                shutil.copy2(path, target)
        return target

    def _append_csv(self, message: dict[str, Any]) -> None:
        assert self.csv_path is not None
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(CSV_COLUMNS)
            writer.writerow([csv_cell(message.get(c)) for c in CSV_COLUMNS])

    # ------------------------------------------------------------------ running
    def run(self, until: Callable[[], bool] | None = None) -> WatchStats:
        """Watch until :meth:`stop` is called (or ``until()`` is true)."""
        try:
            while not self._stop.is_set() and not (until is not None and until()):
                handled = self.scan_once()
                if not handled:
                    # Wait for an event or the next poll; files seen but not yet settled are
                    # looked at again after ``settle`` at the latest.
                    wait = min(self.poll, self.settle) if self._seen else self.poll
                    self._wake.wait(wait)
                    self._wake.clear()
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self, drain: float = 10.0) -> None:
        """Stop the event observer and drain the sinks (what is left is in ``stats.undelivered``)."""
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
        for sink in self.sinks:
            left = sink.close(drain)
            if left:
                self.stats.undelivered[sink.name] = left
        self.sinks = []


__all__ = ["JOURNAL", "MqttSink", "Sink", "WatchStats", "Watcher", "WebhookSink", "make_sinks"]
