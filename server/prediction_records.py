"""A prediction id for every classified document and, when the model's ``prediction_records`` is
on, a record of it in the records database: written off the answer's path, never lost silently.

The answer thread mints the ids and appends the documents' records to a local journal (one JSON
line each, a single ``write`` per answer) before the answer is sent; a ``prediction-records``
thread reads the journal behind it and inserts the records into the database in batches, and
empties the journal whenever it has caught up. So the database never delays an answer, and:

- a process that dies (SIGKILL, out of memory, a stub crash) loses no record of an answer it
  sent: the journal is in the operating system's hands before the answer leaves, and the next
  start replays it (inserts are idempotent on the id, so replaying a stored record is harmless);
- the journal is not fsync'ed per answer, so a power cut can lose the records of answers the
  database had not yet committed (at most ``flush_interval_s`` of them while the database is up);
- while the database is unreachable the records wait in the journal (on disk, not in memory),
  every failed attempt is logged and counted (``pc_prediction_record_failures_total``), and the
  writer retries with a backoff doubling up to ``MAX_BACKOFF_S``; ``pc_prediction_records_pending_documents``
  says how many wait;
- a record that cannot be journaled (disk full) is counted and logged, and the answer is still
  sent: the classification, not its audit trail, is what the caller waits for.

Each model instance owns one journal file, ``<records_journal>/<model>@<instance>.<database>.jsonl``
(``<database>``: a digest of the records database's URL), under an exclusive ``flock``; where
another running server holds that name (a second server on the same repository, or one starting
while the old one drains), the instance takes ``<model>@<instance>.<pid>.<database>.jsonl``. At
start an instance also replays and removes the journals of its model and database that no running
instance holds: a crashed server's, or one a smaller ``instance_group`` no longer starts. The
digest keeps a journal from ever being replayed into another database.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Sequence

from core.engine import DocumentScores
from core.labels import LabelSet
from core.patent_document import PatentDocument
from core.prediction_id import new_prediction_id
from core.serving_config import ServingConfig

log = logging.getLogger("patent_classifier.records")

MAX_BACKOFF_S = 30.0
MAX_BATCH_BYTES = 4 << 20  # records read from the journal per database transaction
RETENTION_INTERVAL_S = 3600.0


@dataclass
class RecorderStats:
    """Totals since start, for the metrics thread to sample."""

    written: int = 0  # records the database committed
    failures: dict[str, int] = field(default_factory=lambda: {"journal": 0, "database": 0})
    pending: int = 0  # records in the journal the database does not have yet


class PredictionIds:
    """``prediction_records: off``: every answer still carries ids, and nothing is kept."""

    def record(self, texts: Sequence[str], documents, scores: Sequence[DocumentScores], top_k: int) -> list[str]:
        return [new_prediction_id() for _ in scores]

    def stats(self) -> RecorderStats | None:
        return None

    def stop(self) -> None:
        pass


def prediction_recorder(config: ServingConfig, model: str, version: str, instance: str, labels: LabelSet):
    if config.prediction_records == "off":
        return PredictionIds()
    from core.prediction_store import PredictionStore

    store = PredictionStore.prepared(config.records_database, register=(model, version, labels))
    recorder = PredictionRecorder(store, model, version, labels, config.records_journal, instance,
                                  keep_text=config.prediction_records == "text", retention_days=config.records_retention_days)
    recorder.start()
    return recorder


class PredictionJournal:
    """Complete JSON lines appended under a lock; read behind the appender; emptied once caught up."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._fd, self.path = _open_owned(path)
        self._size = _drop_torn_tail(self._fd)
        self.pending = _count_lines(self._fd, self._size)

    def append(self, data: bytes, records: int) -> None:
        with self._lock:
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError:
                os.ftruncate(self._fd, self._size)  # no part of a refused append stays in front of the next one
                raise
            self._size += written
            self.pending += records

    def read(self, offset: int) -> tuple[bytes, int]:
        """Complete lines from ``offset`` (at most about ``MAX_BATCH_BYTES``) and the offset after them."""
        with self._lock:
            end = min(self._size, offset + MAX_BATCH_BYTES)
        chunk = os.pread(self._fd, end - offset, offset)
        if end < self._size:
            chunk = chunk[: chunk.rfind(b"\n") + 1]
            if not chunk:  # one line longer than a batch: take it whole
                chunk = os.pread(self._fd, self._size - offset, offset)
                chunk = chunk[: chunk.find(b"\n") + 1]
        return chunk, offset + len(chunk)

    def committed(self, offset: int, records: int) -> int:
        """The database has everything before ``offset``; returns where to read next."""
        with self._lock:
            self.pending -= records
            if offset < self._size:
                return offset
            os.ftruncate(self._fd, 0)  # appends (O_APPEND) continue at the new end
            self._size = 0
            return 0

    def close(self) -> None:
        os.close(self._fd)


def _open_owned(path: Path) -> tuple[int, Path]:
    """The journal's descriptor under an exclusive flock, and its path: ``path``, or, while another
    process holds that, a name of this process's own. Reopened if an adopter removed the file meanwhile."""
    base, digest, extension = path.name.rsplit(".", 2)
    candidates = [path, path.with_name(f"{base}.{os.getpid()}.{digest}.{extension}")]
    while True:
        for candidate in candidates:
            fd = os.open(candidate, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                if os.fstat(fd).st_ino == os.stat(candidate).st_ino:
                    return fd, candidate
            except FileNotFoundError:
                pass
            os.close(fd)
            break
        else:
            time.sleep(0.05)  # both held: an adopter replaying our name, for a moment


def _drop_torn_tail(fd: int) -> int:
    """A line without its newline is a write the process did not finish: its answer was never sent."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    tail = os.pread(fd, min(size, MAX_BATCH_BYTES), max(0, size - MAX_BATCH_BYTES))
    if tail.endswith(b"\n"):
        return size
    keep = size - len(tail) + tail.rfind(b"\n") + 1
    log.warning("prediction journal: dropping an unfinished last line (%d bytes)", size - keep)
    os.ftruncate(fd, keep)
    return keep


def _count_lines(fd: int, size: int) -> int:
    return sum(os.pread(fd, MAX_BATCH_BYTES, offset).count(b"\n") for offset in range(0, size, MAX_BATCH_BYTES))


class PredictionRecorder:
    def __init__(self, store, model: str, version: str, labels: LabelSet, journal_folder: Path, instance: str, *,
                 keep_text: bool, retention_days: int = 0, flush_interval_s: float = 0.2):
        self.store = store
        self.model = model
        self.version = version
        self.codes = labels.codes
        self.keep_text = keep_text
        self.retention_days = retention_days
        self.flush_interval_s = flush_interval_s
        self._journal_suffix = f".{hashlib.sha256(store.url.encode()).hexdigest()[:12]}.jsonl"
        self.journal_path = journal_folder / f"{model}@{instance}{self._journal_suffix}"
        self._stats = RecorderStats()
        self._stats_lock = threading.Lock()  # the answer thread and the writer both count failures
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-records", daemon=True)
        self.journal: PredictionJournal | None = None

    def start(self) -> None:
        self.journal = PredictionJournal(self.journal_path)
        self.journal_path = self.journal.path
        if self.journal.pending:
            log.warning("%s: replaying %d prediction records from %s", self.model, self.journal.pending, self.journal_path)
        self._thread.start()

    def record(self, texts: Sequence[str], documents: Sequence[PatentDocument] | None, scores: Sequence[DocumentScores],
               top_k: int) -> list[str]:
        """Ids for one answer's documents, their records journaled; call before sending the answer."""
        from core.prediction_store import PredictionRecord, utc_now

        now_ms = int(time.time() * 1000)
        created = utc_now()
        ids, lines = [], []
        for index, (text, scored) in enumerate(zip(texts, scores)):
            prediction_id = new_prediction_id(now_ms)
            order, probabilities = scored.top_k(top_k)
            record = PredictionRecord(
                prediction_id, self.model, self.version, created, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                [self.codes[i] for i in order], [float(p) for p in probabilities], scored.token_count, scored.truncated,
                text=text if self.keep_text else None,
                document=documents[index].model_dump() if self.keep_text and documents else None,
            )
            ids.append(prediction_id)
            lines.append(json.dumps(record.to_json(), ensure_ascii=False))
        try:
            self.journal.append(("\n".join(lines) + "\n").encode("utf-8"), len(lines))
        except OSError:
            self._count_failures("journal", len(lines))
            log.exception("%s: %d prediction records could not be journaled and are lost", self.model, len(lines))
        return ids

    def stats(self) -> RecorderStats:
        with self._stats_lock:
            return RecorderStats(self._stats.written, dict(self._stats.failures), self.journal.pending)

    def _count_failures(self, stage: str, count: int) -> None:
        with self._stats_lock:
            self._stats.failures[stage] += count

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what the journal holds (up to the timeout); what is left is replayed at the next start."""
        self._stopping.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.journal.close()
            self.store.close()

    def _run(self) -> None:
        offset, backoff, next_expiry, adopted = 0, self.flush_interval_s, time.monotonic(), False
        while True:
            stopping = self._stopping.wait(backoff)
            try:
                if not adopted:
                    self._adopt_orphaned_journals()
                    adopted = True
                offset = self._write(offset)
                if self.retention_days and time.monotonic() >= next_expiry:
                    self._expire()
                    next_expiry = time.monotonic() + RETENTION_INTERVAL_S
                backoff = self.flush_interval_s
            except Exception as error:  # the database is down or refuses: the journal keeps the records
                self._count_failures("database", 1)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                log.warning("%s: writing prediction records failed (%d pending; retry in %.1f s): %s",
                            self.model, self.journal.pending, backoff, error)
                if stopping:
                    return
                continue
            if stopping:
                return

    def _write(self, offset: int) -> int:
        while True:
            chunk, end = self.journal.read(offset)
            if not chunk:
                return offset
            records = self._parsed(chunk)
            self.store.insert_predictions(records)
            self._stats.written += len(records)
            offset = self.journal.committed(end, chunk.count(b"\n"))

    def _parsed(self, chunk: bytes) -> list:
        """The records of a chunk of journal lines; a line that does not parse is counted lost and
        skipped, so it never holds up the records after it."""
        from core.prediction_store import PredictionRecord

        records = []
        for line in chunk.splitlines():
            try:
                records.append(PredictionRecord.from_json(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                self._count_failures("journal", 1)
                log.error("%s: skipping a prediction journal line that does not parse: %.200r", self.model, line)
        return records

    def _expire(self) -> None:
        from core.prediction_store import utc_now

        removed = self.store.delete_expired(self.model, utc_now() - timedelta(days=self.retention_days))
        if removed:
            log.info("%s: removed %d prediction records older than %d days", self.model, removed, self.retention_days)

    def _adopt_orphaned_journals(self) -> None:
        for path in sorted(self.journal_path.parent.glob(f"{self.model}@*{self._journal_suffix}")):
            if path == self.journal_path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a running instance owns it
                os.close(fd)
                continue
            try:
                size = _drop_torn_tail(fd)
                records = self._parsed(os.pread(fd, size, 0)) if size else []
                self.store.insert_predictions(records)
                log.warning("%s: replayed %d prediction records from %s, which no running instance owns", self.model,
                            len(records), path)
                path.unlink()
            finally:
                os.close(fd)
