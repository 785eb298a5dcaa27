"""The prediction log: every scored image as one row of an embedded SQLite database.

Why: a model on a line must be able to say afterwards what it scored, when, with which
model version and threshold, so that an alarm can be traced, the false-alarm rate measured
and images confirmed good later folded back in. SQLite ships with Python, needs no server,
and in WAL mode readers (``GET /history``) never wait for the writer.

Writes never block scoring: :meth:`PredictionLog.record` only puts the row on a queue; one
writer thread hashes the image (SHA-256), inserts rows in batches and commits. Rows still
queued are written by :meth:`PredictionLog.close` (or when the process exits normally).

The schema (``SCHEMA_VERSION``, documented in docs/design.md, "Prediction log") is stored
in the database; a log of a newer version is refused rather than written in a shape its
readers do not expect.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import sqlite3
import threading
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .fileio import atomic_write_bytes, sha256_file

#: Version of the tables below; bump it (and migrate, :data:`_MIGRATIONS`) when they change.
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stmae_log (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT UNIQUE,
    time TEXT NOT NULL,
    sha256 TEXT,
    source TEXT NOT NULL,
    score REAL NOT NULL,
    normalized REAL,
    label INTEGER NOT NULL,
    threshold REAL,
    model TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    heatmap TEXT,
    image TEXT
);
CREATE INDEX IF NOT EXISTS predictions_model_time ON predictions (model, time);
CREATE INDEX IF NOT EXISTS predictions_label_time ON predictions (label, time);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL REFERENCES predictions (uid),
    time TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('good', 'defect')),
    note TEXT,
    folded_into INTEGER
);
CREATE INDEX IF NOT EXISTS feedback_uid ON feedback (uid);
"""

#: Schema version -> statements that bring a log of that version to the next.
_MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE predictions ADD COLUMN uid TEXT; ALTER TABLE predictions ADD COLUMN image TEXT; "
       "CREATE UNIQUE INDEX IF NOT EXISTS predictions_uid ON predictions (uid);",
}

#: The columns of a row, in table order (``id`` first).
COLUMNS = ("id", "uid", "time", "sha256", "source", "score", "normalized", "label", "threshold", "model",
           "model_version", "heatmap", "image")

#: Which scored images the log keeps a copy of (needed to fold confirmed-good ones into a run).
KEEP_IMAGES = ("none", "flagged", "all")

VERDICTS = ("good", "defect")


class LogError(ValueError):
    """The log file cannot be used (not a database, a newer schema, a bad query)."""


@dataclass
class Entry:
    """One scored image, as handed to :meth:`PredictionLog.record`.

    Give ``data`` (the image bytes as received) or ``path`` (a file to hash) for the SHA-256;
    with neither the hash is left empty (e.g. an in-memory array).
    """

    source: str
    score: float
    normalized: float | None
    label: int
    threshold: float | None
    model: str
    model_version: int
    data: bytes | None = None
    path: str | None = None
    heatmap: str | None = None
    time: str | None = None
    #: Set by :meth:`PredictionLog.record`: the row's id for feedback (returned to clients).
    uid: str | None = None
    #: File name suffix for a kept copy of ``data`` (e.g. ".png").
    suffix: str = ".png"


def now() -> str:
    """UTC time with milliseconds, ISO 8601: sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class PredictionLog:
    """An append-only log of predictions in the SQLite file ``path`` (created if missing).

    ``keep_images``: which uploaded images (given as ``Entry.data``) are also kept, as files
    named by their SHA-256 in ``<path>.images/`` (:data:`KEEP_IMAGES`; ``flagged`` by
    default: the ones an operator may confirm as good). Images scored from files on disk
    are referenced by their path instead.
    """

    def __init__(self, path: str | os.PathLike, keep_images: str = "flagged") -> None:
        if keep_images not in KEEP_IMAGES:
            raise LogError(f"keep_images must be one of {KEEP_IMAGES}, got {keep_images!r}")
        self.path = Path(path)
        self.keep_images = keep_images
        self.images_dir = self.path.with_name(self.path.name + ".images")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connect()
            version = _schema_version(conn)
            if version is not None and version > SCHEMA_VERSION:
                conn.close()
                raise LogError(
                    f"{self.path}: a prediction log of schema {version}, newer than this stmae's "
                    f"{SCHEMA_VERSION}; upgrade stmae or log to another file"
                )
            while version is not None and version < SCHEMA_VERSION:
                conn.executescript(_MIGRATIONS[version])
                version += 1
                conn.execute("UPDATE stmae_log SET value = ? WHERE key = 'schema_version'", (str(version),))
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO stmae_log VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.commit()
        except sqlite3.DatabaseError as exc:
            raise LogError(f"{self.path}: not usable as a prediction log ({exc})") from None
        self._conn = conn
        self._queue: queue.Queue[Entry | None] = queue.Queue()
        self._failed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="stmae-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # ------------------------------------------------------------------ writing
    def record(self, entry: Entry) -> str:
        """Queue one row (returns at once; the writer thread hashes and inserts it) and return
        its ``uid``, by which feedback names it."""
        if self._closed:
            raise LogError(f"{self.path}: the log is closed")
        if entry.time is None:
            entry.time = now()
        if entry.uid is None:
            entry.uid = uuid.uuid4().hex
        self._queue.put(entry)
        return entry.uid

    def record_many(self, entries: Iterable[Entry]) -> None:
        for entry in entries:
            self.record(entry)

    def flush(self) -> None:
        """Wait until every row queued so far is committed."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, stop the writer and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._conn.close()
        if self._failed:
            warnings.warn(f"{self.path}: {self._failed} prediction rows could not be written", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while first is not None:  # take what else is waiting: one commit per burst
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
                if nxt is None:
                    break
            rows = [self._row(e) for e in batch if e is not None]
            if rows:
                try:
                    self._conn.executemany(
                        "INSERT INTO predictions (uid, time, sha256, source, score, normalized, label, threshold, model, "
                        "model_version, heatmap, image) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
                    )
                    self._conn.commit()
                except sqlite3.Error:
                    self._failed += len(rows)
            for _ in batch:
                self._queue.task_done()
            if batch[-1] is None:
                return

    # ------------------------------------------------------------------ reading
    def query(
        self,
        *,
        model: str | None = None,
        label: int | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, up to ``limit`` rows from ``offset``), newest first.

        ``since``/``until``: ISO 8601 times (UTC), inclusive / exclusive.
        """
        if not 1 <= limit <= 1000 or offset < 0:
            raise LogError("limit must be 1-1000 and offset >= 0")
        where, args = [], []
        for column, op, value in (("model", "=", model), ("label", "=", label), ("time", ">=", _time(since)),
                                  ("time", "<", _time(until))):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            total = conn.execute(f"SELECT COUNT(*) FROM predictions{clause}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT {', '.join(COLUMNS)} FROM predictions{clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        finally:
            conn.close()
        return int(total), [dict(zip(COLUMNS, r)) for r in rows]

    # ------------------------------------------------------------------ feedback
    def add_feedback(self, uid: str, verdict: str, note: str | None = None) -> int:
        """Store an operator's verdict on a logged prediction; returns the feedback id.

        Raises LogError for an unknown verdict or a ``uid`` not (yet) in the log."""
        if verdict not in VERDICTS:
            raise LogError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.flush()  # a prediction answered a moment ago may still be queued
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            if conn.execute("SELECT 1 FROM predictions WHERE uid = ?", (uid,)).fetchone() is None:
                raise LogError(f"no logged prediction has the id {uid!r}")
            cur = conn.execute("INSERT INTO feedback (uid, time, verdict, note) VALUES (?, ?, ?, ?)",
                               (uid, now(), verdict, note))
            conn.commit()
            return int(cur.lastrowid or 0)
        finally:
            conn.close()

    def confirmed(self, verdict: str, model: str | None = None, unfolded: bool = True) -> list[dict[str, Any]]:
        """Predictions whose latest feedback is ``verdict`` (for one model), each with its
        ``image`` file (kept copy or the scored path) and ``feedback_id``; with ``unfolded``
        only those not yet folded into a model version."""
        where = ["f.verdict = ?", "f.id = (SELECT MAX(id) FROM feedback WHERE uid = p.uid)"]
        args: list[Any] = [verdict]
        if model is not None:
            where.append("p.model = ?")
            args.append(model)
        if unfolded:
            where.append("f.folded_into IS NULL")
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            rows = conn.execute(
                f"SELECT {', '.join('p.' + c for c in COLUMNS)}, f.id FROM predictions p JOIN feedback f ON f.uid = p.uid "
                f"WHERE {' AND '.join(where)} ORDER BY p.id", args,
            ).fetchall()
        finally:
            conn.close()
        return [{**dict(zip(COLUMNS, r[:-1])), "feedback_id": r[-1]} for r in rows]

    def mark_folded(self, feedback_ids: Iterable[int], version: int) -> None:
        """Record that these confirmations went into model ``version`` (not folded twice)."""
        ids = list(feedback_ids)
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            conn.executemany("UPDATE feedback SET folded_into = ? WHERE id = ?", [(version, i) for i in ids])
            conn.commit()
        finally:
            conn.close()

    def _row(self, e: Entry) -> tuple[Any, ...]:
        digest = None
        image = e.path
        if e.data is not None:
            digest = hashlib.sha256(e.data).hexdigest()
            if self.keep_images == "all" or (self.keep_images == "flagged" and e.label == 1):
                image = str(self._keep(digest, e.data, e.suffix))
        elif e.path is not None:
            try:
                digest = sha256_file(e.path)
            except OSError:
                digest = None  # the file went away after scoring; the row still counts
        return (e.uid, e.time, digest, e.source, float(e.score), None if e.normalized is None else float(e.normalized),
                int(e.label), None if e.threshold is None else float(e.threshold), e.model, int(e.model_version),
                e.heatmap, image)

    def _keep(self, digest: str, data: bytes, suffix: str) -> Path:
        """The image bytes as ``<images_dir>/<sha[:2]>/<sha><suffix>`` (written once, atomically)."""
        target = self.images_dir / digest[:2] / f"{digest}{suffix}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
        return target


def _schema_version(conn: sqlite3.Connection) -> int | None:
    has = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='stmae_log'").fetchone()
    if not has:
        return None
    row = conn.execute("SELECT value FROM stmae_log WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else None


def _time(value: str | None) -> str | None:
    """An ISO 8601 time as stored (UTC, milliseconds); LogError naming a bad one."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise LogError(f"not an ISO 8601 time: {value!r} (e.g. 2026-12-07T08:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def model_identity(model: Any, path: str | os.PathLike | None = None) -> tuple[str, int]:
    """(name, version) of a scorer for the log: the run folder's (or export's) name and the
    run's ``model_version`` (1 for a run never updated)."""
    meta = getattr(model, "meta", None) or {}
    name = Path(path).name if path is not None else str(meta.get("name") or "model")
    return name, int(meta.get("model_version", 1))


__all__ = ["COLUMNS", "Entry", "KEEP_IMAGES", "LogError", "PredictionLog", "SCHEMA_VERSION", "VERDICTS",
           "model_identity", "now"]
