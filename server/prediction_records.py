"""A prediction id for every classified document and, when the model's ``prediction_records`` is
on, a record of it in the records database: written off the answer's path, never lost silently.

The answer thread mints the ids and appends the documents' records to a local journal (one JSON
line each, a single ``write`` per answer) before the answer is sent; a ``prediction-records``
thread reads the journal behind it and inserts the records into the database in batches, and
empties the journal whenever it has caught up. Classification never waits for the database, nor
fails because of it: loading a model connects to nothing; the writer thread upgrades the schema,
registers the model and writes, retrying each with a backoff doubling up to ``MAX_BACKOFF_S``.

- A process that dies (SIGKILL, out of memory, a stub crash) loses no record of an answer it
  sent: the journal is in the operating system's hands before the answer leaves, and the next
  start replays it (inserts are idempotent on the id, so replaying a stored record is harmless).
- The journal is not fsync'ed per answer, so a power cut can lose the records of answers the
  database had not yet committed (at most ``flush_interval_s`` of them while the database is up).
- While the database is away the records wait in the journal (on disk, not in memory), every
  failed attempt is logged and counted (``pc_prediction_record_failures_total{stage="database"}``);
  ``pc_prediction_records_pending_documents`` says how many wait. The journal holds at most
  ``records_journal_max_bytes``: past it, records of further answers are dropped and counted
  (``stage="journal"``, as records the disk refuses are), and the answers still go out.
- A record the database refuses for what it holds (a value it cannot store, a constraint; told
  apart from a database that is away by the error's class, ``refused_by_database``) is found by
  halving the batch it came in, and set aside with the error in ``<model>.<database>.quarantine.jsonl``
  beside the journals (``stage="quarantined"``), as is a line that does not parse: the records
  after it go on. A batch is never retried forever for one record.

Each instance owns its journal ``<records_journal>/<model>@<replica>@<instance>.<database>.jsonl``
under an exclusive ``flock`` (``<replica>``: the pod or host, ``PATENT_CLASSIFIER_REPLICA``; never
a PID, which repeats across pods sharing a volume; ``<database>``: a digest of the database's URL,
so a journal is never replayed into another database). A second server of the same replica on the
same folder takes ``…@<instance>~2``, and so on. At start, and every ``ADOPT_INTERVAL_S``, a writer
replays, chunk by chunk, and removes the journals of its model and database that nobody holds: its
own replica's at once (a crashed server's, or one a smaller ``instance_group`` no longer starts),
another replica's once that writer is gone (no heartbeat and no write for ``WRITER_GONE_AFTER_S``).

Each writer keeps a row in ``record_writers``: a heartbeat, and a watermark, "every record I minted
before T is stored". The feedback model reads them to tell a correction of a record still on its
way (retry) from one of a prediction never recorded (server/feedback_service.py).
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

from core.engine import DocumentScores
from core.labels import LabelSet
from patent_classifier_client.patent_document import PatentDocument
from patent_classifier_client.prediction_id import new_prediction_id
from core.serving_config import ServingConfig

log = logging.getLogger("patent_classifier.records")

MAX_BACKOFF_S = 30.0
MAX_BATCH_BYTES = 4 << 20  # records read from a journal per database transaction
RETENTION_INTERVAL_S = 3600.0
HEARTBEAT_INTERVAL_S = 1.0  # how often a writer renews its watermark: well under the feedback model's pending_wait_s
ADOPT_INTERVAL_S = 60.0
CHECKPOINT_INTERVAL_S = 1.0  # how finely the journal remembers its appends' mint times (the watermark's grain)
MAX_SERVERS_PER_JOURNAL_NAME = 64


@dataclass
class RecorderStats:
    """Totals since start, for the metrics thread to sample."""

    written: int = 0  # records the database committed
    failures: dict[str, int] = field(default_factory=lambda: {"journal": 0, "database": 0, "quarantined": 0})
    pending: int = 0  # records in the journal the database does not have yet
    journal_bytes: int = 0
    journal_limit_bytes: int = 0


class PredictionIds:
    """``prediction_records: off``: every answer still carries ids, and nothing is kept."""

    def record(self, texts: Sequence[str], documents, scores: Sequence[DocumentScores], top_k: int) -> list[str]:
        return [new_prediction_id() for _ in scores]

    def stats(self) -> RecorderStats | None:
        return None

    def stop(self) -> None:
        pass


def prediction_recorder(config: ServingConfig, model: str, version: str, instance: str, labels: LabelSet):
    """The model's recorder, started; it connects to nothing here, so no database state can fail a load."""
    if config.prediction_records == "off":
        return PredictionIds()
    from core.prediction_store import PredictionStore

    store = PredictionStore(config.records_database, password_file=config.records_password_file)
    recorder = PredictionRecorder(
        store, model, version, labels, config.records_journal, instance, replica=config.replica or socket.gethostname(),
        keep_text=config.prediction_records == "text", retention_days=config.records_retention_days,
        max_journal_bytes=config.records_journal_max_bytes,
    )
    recorder.start()
    return recorder


class JournalFull(Exception):
    """The journal holds ``max_bytes``: this answer's records are not journaled."""


class PredictionJournal:
    """Complete JSON lines appended under a lock; read behind the appender; emptied once caught up.

    It also knows, for the watermark, a time before which every record it was given is committed:
    each answer's ids are minted inside ``minting()``, and each append remembers (at most once per
    ``CHECKPOINT_INTERVAL_S``) the oldest mint still unfinished, which no later line can precede."""

    def __init__(self, path: Path, max_bytes: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd, self.path = _open_owned(path)
        self._size = _drop_torn_tail(self._fd)
        self.pending = _count_lines(self._fd, self._size)
        self.offset = 0  # the writer's position: everything before it is committed
        self._minting: collections.Counter[int] = collections.Counter()
        # (start of an append, oldest mint unfinished then): lines from there on were minted no earlier.
        # A journal found at start was minted at times unknown: 0 promises nothing until it is written.
        self._checkpoints: collections.deque[tuple[int, int]] = collections.deque([(0, 0)] if self._size else [])
        self._last_checkpoint = 0.0

    @contextlib.contextmanager
    def minting(self) -> Iterator[int]:
        """The time (Unix ms) to mint an answer's ids at; until the block ends it holds the watermark back."""
        with self._lock:
            now_ms = int(time.time() * 1000)
            self._minting[now_ms] += 1
        try:
            yield now_ms
        finally:
            with self._lock:
                self._minting[now_ms] -= 1
                if not self._minting[now_ms]:
                    del self._minting[now_ms]

    def append(self, data: bytes, records: int) -> None:
        with self._lock:
            if self.max_bytes is not None and self._size + len(data) > self.max_bytes:
                raise JournalFull(f"the journal holds {self._size} bytes; records_journal_max_bytes is {self.max_bytes}")
            now = time.monotonic()
            if not self._checkpoints or now - self._last_checkpoint >= CHECKPOINT_INTERVAL_S:
                self._checkpoints.append((self._size, min(self._minting, default=int(time.time() * 1000))))
                self._last_checkpoint = now
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError:
                os.ftruncate(self._fd, self._size)  # no part of a refused append stays in front of the next one
                raise
            self._size += written
            self.pending += records

    @property
    def size(self) -> int:
        return self._size

    def read(self) -> bytes:
        """Complete lines from ``offset``, about ``MAX_BATCH_BYTES`` at most (one longer line whole)."""
        with self._lock:
            end = self._size
        return _complete_lines(self._fd, self.offset, end)

    def committed(self, length: int, records: int) -> None:
        """The database has the next ``length`` bytes from ``offset``, ``records`` lines."""
        with self._lock:
            self.offset += length
            self.pending -= records
            while len(self._checkpoints) > 1 and self._checkpoints[1][0] <= self.offset:
                self._checkpoints.popleft()
            if self.offset < self._size:
                return
            os.ftruncate(self._fd, 0)  # appends (O_APPEND) continue at the new end
            self._size = self.offset = 0
            self._checkpoints.clear()

    def watermark_ms(self) -> int:
        """Every record minted before this time (Unix ms) is committed."""
        with self._lock:
            if self.offset == self._size:
                return min(self._minting, default=int(time.time() * 1000))
            return self._checkpoints[0][1]

    def close(self) -> None:
        os.close(self._fd)


def _open_owned(path: Path) -> tuple[int, Path]:
    """The journal's descriptor under an exclusive flock, and its path: ``path``, or, while other
    servers of the same name hold that, ``…~2``, ``…~3``. Reopened if an adopter removed the file meanwhile."""
    base, digest, extension = path.name.rsplit(".", 2)
    for number in range(1, MAX_SERVERS_PER_JOURNAL_NAME + 1):
        candidate = path.with_name(f"{base}{'' if number == 1 else f'~{number}'}.{digest}.{extension}")
        while True:
            fd = os.open(candidate, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                break  # another server's: the next name
            try:
                if os.fstat(fd).st_ino == os.stat(candidate).st_ino:
                    return fd, candidate
            except FileNotFoundError:
                pass
            os.close(fd)  # an adopter replayed and removed it as we opened it: open it anew
    raise RuntimeError(f"records_journal: {MAX_SERVERS_PER_JOURNAL_NAME} running servers hold the journals named {base} in "
                       f"{path.parent}; give each server a replica name of its own (PATENT_CLASSIFIER_REPLICA)")


def _drop_torn_tail(fd: int) -> int:
    """A line without its newline is a write the process did not finish: its answer was never sent."""
    size = os.fstat(fd).st_size
    keep = size
    while keep > 0:
        block = os.pread(fd, min(keep, MAX_BATCH_BYTES), keep - min(keep, MAX_BATCH_BYTES))
        newline = block.rfind(b"\n")
        if newline >= 0:
            keep = keep - len(block) + newline + 1
            break
        keep -= len(block)
    if keep < size:
        log.warning("prediction journal: dropping an unfinished last line (%d bytes)", size - keep)
        os.ftruncate(fd, keep)
    return keep


def _count_lines(fd: int, size: int) -> int:
    return sum(os.pread(fd, min(MAX_BATCH_BYTES, size - offset), offset).count(b"\n") for offset in range(0, size, MAX_BATCH_BYTES))


def _complete_lines(fd: int, offset: int, end: int) -> bytes:
    """Complete lines from ``offset`` (``end`` is at a line's end), about ``MAX_BATCH_BYTES`` at most; a
    longer line whole."""
    chunk = os.pread(fd, min(end - offset, MAX_BATCH_BYTES), offset)
    if offset + len(chunk) >= end:
        return chunk
    cut = chunk.rfind(b"\n") + 1
    while not cut:  # one line longer than a batch
        more = os.pread(fd, min(end - offset - len(chunk), MAX_BATCH_BYTES), offset + len(chunk))
        newline = more.find(b"\n")
        if newline >= 0:
            return chunk + more[: newline + 1]
        chunk += more
    return chunk[:cut]


@dataclass(frozen=True)
class JournalLine:
    raw: bytes  # with its newline
    record: object | None  # a core.prediction_store.PredictionRecord, or None when it does not parse
    problem: str | None = None


class PredictionRecorder:
    def __init__(self, store, model: str, version: str, labels: LabelSet, journal_folder: Path, instance: str, *,
                 keep_text: bool, retention_days: int = 0, flush_interval_s: float = 0.2, replica: str | None = None,
                 max_journal_bytes: int | None = None):
        self.store = store
        self.model = model
        self.version = version
        self.labels = labels
        self.codes = labels.codes
        self.keep_text = keep_text
        self.retention_days = retention_days
        self.flush_interval_s = flush_interval_s
        self.replica = replica or socket.gethostname()
        self.max_journal_bytes = max_journal_bytes
        self.journal_folder = Path(journal_folder)
        self._journal_suffix = f".{hashlib.sha256(store.url.encode()).hexdigest()[:12]}.jsonl"
        self.journal_path = self.journal_folder / f"{model}@{self.replica}@{instance}{self._journal_suffix}"
        self.quarantine_path = self.journal_folder / f"{model}{self._journal_suffix.removesuffix('.jsonl')}.quarantine.jsonl"
        self._stats = RecorderStats(journal_limit_bytes=max_journal_bytes or 0)
        self._stats_lock = threading.Lock()  # the answer thread and the writer both count failures
        self._journal_full = False  # logged once per spell, not once per answer
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-records", daemon=True)
        self.journal: PredictionJournal | None = None

    @property
    def writer(self) -> str:
        """This writer's name in ``record_writers``: its journal's name without the database digest."""
        return self.journal_path.name.removesuffix(self._journal_suffix)

    def start(self) -> None:
        self.journal = PredictionJournal(self.journal_path, self.max_journal_bytes)
        self.journal_path = self.journal.path
        if self.journal.pending:
            log.warning("%s: replaying %d prediction records from %s", self.model, self.journal.pending, self.journal_path)
        self._thread.start()

    def record(self, texts: Sequence[str], documents: Sequence[PatentDocument] | None, scores: Sequence[DocumentScores],
               top_k: int) -> list[str]:
        """Ids for one answer's documents, their records journaled; call before sending the answer. It
        never raises for the records: the classification, not its audit trail, is what the caller waits for."""
        from core.prediction_store import PredictionRecord

        with self.journal.minting() as now_ms:
            created = datetime.fromtimestamp(now_ms / 1000, timezone.utc).replace(tzinfo=None)
            ids, lines = [], []
            for index, (text, scored) in enumerate(zip(texts, scores)):
                prediction_id = new_prediction_id(now_ms)
                order, probabilities = scored.top_k(top_k)
                record = PredictionRecord(
                    prediction_id, self.model, self.version, created, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                    [self.codes[i] for i in order],
                    # JSON has no NaN: PostgreSQL's json refuses it. null says "no probability" in both databases.
                    [float(p) if math.isfinite(p) else None for p in probabilities], scored.token_count, scored.truncated,
                    text=text if self.keep_text else None,
                    document=documents[index].model_dump() if self.keep_text and documents else None,
                )
                ids.append(prediction_id)
                lines.append(json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False))
            if lines:
                self._journal(("\n".join(lines) + "\n").encode("utf-8"), len(lines))
        return ids

    def _journal(self, data: bytes, records: int) -> None:
        try:
            self.journal.append(data, records)
        except JournalFull as full:
            self._count_failures("journal", records)
            if not self._journal_full:
                log.error("%s: records of answers are dropped until the database takes the journal's: %s", self.model, full)
            self._journal_full = True
            return
        except OSError:
            self._count_failures("journal", records)
            log.exception("%s: %d prediction records could not be journaled and are lost", self.model, records)
            return
        if self._journal_full:
            log.warning("%s: journaling records again", self.model)
            self._journal_full = False

    def stats(self) -> RecorderStats:
        with self._stats_lock:
            return RecorderStats(self._stats.written, dict(self._stats.failures), self.journal.pending, self.journal.size,
                                 self._stats.journal_limit_bytes)

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

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff, prepared, failing = self.flush_interval_s, False, False
        next_adoption = next_expiry = next_heartbeat = time.monotonic()
        while True:
            stopping = self._stopping.wait(backoff)
            try:
                if not prepared:
                    self.store.upgrade_schema()
                    self.store.register_model(self.model, self.version, self.labels)
                    prepared = True
                if time.monotonic() >= next_adoption:
                    self._adopt_orphaned_journals()
                    next_adoption = time.monotonic() + ADOPT_INTERVAL_S
                self._write()
                if stopping or time.monotonic() >= next_heartbeat:
                    self.store.heartbeat(self.writer, self.model, self.replica, self.journal.watermark_ms(), int(time.time() * 1000))
                    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
                if self.retention_days and time.monotonic() >= next_expiry:
                    self._expire()
                    next_expiry = time.monotonic() + RETENTION_INTERVAL_S
                if stopping and self.journal.pending == 0:
                    self.store.retire_writer(self.writer)  # everything it minted is stored; it mints no more
            except Exception as error:  # the database is away, or not ready: the journal keeps the records
                self._count_failures("database", 1)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                failing = True
                log.warning("%s: writing prediction records failed (%d pending; retry in %.1f s): %s",
                            self.model, self.journal.pending, backoff, _described(error))
                if stopping:
                    return
                continue
            if failing:
                log.warning("%s: writing prediction records again (%d pending)", self.model, self.journal.pending)
            backoff, failing = self.flush_interval_s, False
            if stopping:
                return

    def _write(self) -> None:
        while chunk := self.journal.read():
            self._store_lines(chunk, self.journal_path.name, self.journal.committed)

    def _store_lines(self, chunk: bytes, source: str, done: Callable[[int, int], None]) -> None:
        """Insert a chunk's records. A batch the database refuses is halved until the refused records
        are found and set aside; ``done(bytes, lines)`` is told each finished stretch, in order, so a
        database that goes away midway costs no stretch twice."""
        lines = [self._parsed(raw) for raw in chunk.splitlines(keepends=True)]

        def store(first: int, last: int) -> None:
            batch = lines[first:last]
            try:
                self.store.insert_predictions([line.record for line in batch if line.record is not None])
            except Exception as error:
                from core.prediction_store import refused_by_database

                if not refused_by_database(error):
                    raise
                if last - first > 1:
                    middle = (first + last) // 2
                    store(first, middle)
                    store(middle, last)
                    return
                self._quarantine(batch[0], source, _described(error))
            else:
                for line in batch:
                    if line.record is None:
                        self._quarantine(line, source, line.problem)
                with self._stats_lock:
                    self._stats.written += sum(1 for line in batch if line.record is not None)
            done(sum(len(line.raw) for line in batch), len(batch))

        if lines:
            store(0, len(lines))

    def _parsed(self, raw: bytes) -> JournalLine:
        from core.prediction_store import PredictionRecord

        try:
            return JournalLine(raw, PredictionRecord.from_json(json.loads(raw)))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            return JournalLine(raw, None, f"the line is no prediction record: {_described(error)}")

    def _quarantine(self, line: JournalLine, source: str, problem: str) -> None:
        """Set a record aside, with the reason, where an operator finds it; it never holds up the ones after it."""
        entry = {"quarantined_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "journal": source,
                 "error": problem, "line": line.raw.decode("utf-8", "replace").rstrip("\n")}
        try:
            fd = os.open(self.quarantine_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            self._count_failures("journal", 1)
            log.exception("%s: a refused prediction record could not be set aside and is lost", self.model)
            return
        self._count_failures("quarantined", 1)
        log.error("%s: a prediction record was set aside in %s: %s", self.model, self.quarantine_path, entry["error"])

    def _expire(self) -> None:
        from core.prediction_store import utc_now

        removed = self.store.delete_expired(self.model, utc_now() - timedelta(days=self.retention_days))
        if removed:
            log.info("%s: removed %d prediction records older than %d days", self.model, removed, self.retention_days)

    def _adopt_orphaned_journals(self) -> None:
        from core.prediction_store import WRITER_GONE_AFTER_S

        marks = None
        for path in sorted(self.journal_folder.glob(f"{self.model}@*{self._journal_suffix}")):
            writer = path.name.removesuffix(self._journal_suffix)
            if path == self.journal_path:
                continue
            parts = writer.split("@")  # model, replica, instance; a name without a replica part is this replica's
            if len(parts) == 3 and parts[1] != self.replica:
                # Another replica's (pods sharing a volume, where a lock may not reach across machines):
                # only once its writer is gone, neither heartbeat nor write for WRITER_GONE_AFTER_S.
                if marks is None:
                    marks = {mark.writer: mark for mark in self.store.writer_marks()}
                mark = marks.get(writer)
                try:
                    quiet_s = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if quiet_s < WRITER_GONE_AFTER_S or (mark and time.time() * 1000 - mark.heartbeat_ms < WRITER_GONE_AFTER_S * 1000):
                    continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a running server owns it
                os.close(fd)
                continue
            try:
                self._replay(fd, path, writer)
            finally:
                os.close(fd)

    def _replay(self, fd: int, path: Path, writer: str) -> None:
        """Chunk by chunk, each its own transaction; interrupted, the next try starts over (inserts are idempotent)."""
        size = _drop_torn_tail(fd)
        position, lines = 0, 0

        def done(length: int, count: int) -> None:
            nonlocal position, lines
            position, lines = position + length, lines + count

        while position < size:
            self._store_lines(_complete_lines(fd, position, size), path.name, done)
        self.store.retire_writer(writer)
        path.unlink()
        log.warning("%s: replayed %d prediction records from %s, which no running server owns", self.model, lines, path)



def _described(error: BaseException) -> str:
    from core.prediction_store import describe_error

    return describe_error(error)
