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
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .fileio import sha256_file

#: Version of the tables below; bump it (and migrate) when they change.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stmae_log (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    sha256 TEXT,
    source TEXT NOT NULL,
    score REAL NOT NULL,
    normalized REAL,
    label INTEGER NOT NULL,
    threshold REAL,
    model TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    heatmap TEXT
);
CREATE INDEX IF NOT EXISTS predictions_model_time ON predictions (model, time);
CREATE INDEX IF NOT EXISTS predictions_label_time ON predictions (label, time);
"""

#: The columns of a row, in table order (``id`` first).
COLUMNS = ("id", "time", "sha256", "source", "score", "normalized", "label", "threshold", "model",
           "model_version", "heatmap")


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


def now() -> str:
    """UTC time with milliseconds, ISO 8601: sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class PredictionLog:
    """An append-only log of predictions in the SQLite file ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
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
    def record(self, entry: Entry) -> None:
        """Queue one row (returns at once; the writer thread hashes and inserts it)."""
        if self._closed:
            raise LogError(f"{self.path}: the log is closed")
        if entry.time is None:
            entry.time = now()
        self._queue.put(entry)

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
            rows = [_row(e) for e in batch if e is not None]
            if rows:
                try:
                    self._conn.executemany(
                        "INSERT INTO predictions (time, sha256, source, score, normalized, label, threshold, model, "
                        "model_version, heatmap) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
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


def _row(e: Entry) -> tuple[Any, ...]:
    digest = None
    if e.data is not None:
        digest = hashlib.sha256(e.data).hexdigest()
    elif e.path is not None:
        try:
            digest = sha256_file(e.path)
        except OSError:
            digest = None  # the file went away after scoring; the row still counts
    return (e.time, digest, e.source, float(e.score), None if e.normalized is None else float(e.normalized),
            int(e.label), None if e.threshold is None else float(e.threshold), e.model, int(e.model_version), e.heatmap)


def model_identity(model: Any, path: str | os.PathLike | None = None) -> tuple[str, int]:
    """(name, version) of a scorer for the log: the run folder's (or export's) name and the
    run's ``model_version`` (1 for a run never updated)."""
    meta = getattr(model, "meta", None) or {}
    name = Path(path).name if path is not None else str(meta.get("name") or "model")
    return name, int(meta.get("model_version", 1))


__all__ = ["COLUMNS", "Entry", "LogError", "PredictionLog", "SCHEMA_VERSION", "model_identity", "now"]
