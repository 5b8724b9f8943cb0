"""Prediction records and examiners' corrections in a SQL database, through SQLAlchemy 2.

One schema for SQLite (a file: the default, nothing to start) and PostgreSQL (by URL, for
production), created and upgraded by the Alembic migrations in ``core/prediction_migrations``:
``PredictionStore.upgrade_schema`` runs them, and every records writer and the feedback model
call it once they reach the database (never on a model's load: a database away then must not
fail it), under a lock (a file lock for SQLite, an advisory lock for PostgreSQL), so the several
Triton stubs that reach it at once upgrade it exactly once.

    served_models  (model, version) → its classes, so a correction can be checked against them
    predictions    one row per classified document: id, model, version, time, SHA-256 of the
                   rendered text, the text and structured document only when configured, top-k
    feedback       at most one correction per prediction: the class the examiner says is right,
                   verdict (correct: it is the predicted top-1; wrong), examiner id, comment, time
    record_writers one row per records writer (a model instance's journal): every record it minted
                   before written_through_ms is in predictions; heartbeat_ms, its last contact. The
                   feedback model reads them to tell a record still on its way from one that never was

Times are UTC, stored without a zone (SQLite has none).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

from sqlalchemy import (
    JSON, BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text, create_engine,
    event, func, select, text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError

from patent_classifier_client.errors import InvalidInput, ServerUnavailable
from patent_classifier_client.feedback_protocol import CORRECT_LABEL, PREDICTION_ID, Correction
from core.labels import LabelSet
from core.serving_config import normalized_database_url

log = logging.getLogger("patent_classifier.records")

MIGRATIONS = Path(__file__).resolve().parent / "prediction_migrations"
# Any fixed 64-bit number: the advisory lock that serialises schema upgrades on PostgreSQL.
_PG_MIGRATION_LOCK = 0x7063_7265_636F_7264  # "pcrecord"
SQLITE_BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10
# A records writer whose heartbeat is this much older than the newest writer's has stopped (its
# replica is gone): records it minted after its watermark are no longer expected. Relative to the
# newest heartbeat, so a database outage, which stops every writer's heartbeat alike, stops none.
WRITER_GONE_AFTER_S = 600.0

METADATA = MetaData()

served_models = Table(
    "served_models", METADATA,
    Column("model", String(128), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("labels", JSON, nullable=False),  # [[code, name], ...] in the model's class order
    Column("registered_at", DateTime, nullable=False),
)

predictions = Table(
    "predictions", METADATA,
    Column("id", String(36), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("text_sha256", String(64), nullable=False),
    Column("text", Text),  # the rendered model input: only with prediction_records: text
    Column("document", JSON),  # the structured patent, when it came as DOCUMENT: only with text
    Column("top_label", String(128), nullable=False),
    Column("top_labels", JSON, nullable=False),  # codes, most likely first
    Column("top_probabilities", JSON, nullable=False),
    Column("token_count", Integer, nullable=False),
    Column("truncated", Boolean, nullable=False),
    Index("ix_predictions_model_created_at", "model", "created_at"),
)

feedback = Table(
    "feedback", METADATA,
    Column("prediction_id", String(36), ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("verdict", String(8), nullable=False),
    Column("correct_label", String(128), nullable=False),
    Column("examiner_id", String(128)),
    Column("comment", Text),
    Column("created_at", DateTime, nullable=False),
    Index("ix_feedback_model_created_at", "model", "created_at"),
)

record_writers = Table(
    "record_writers", METADATA,
    Column("writer", String(512), primary_key=True),  # the writer's journal: <model>@<replica>@<instance>[~n]
    Column("model", String(128), nullable=False),
    Column("replica", String(253), nullable=False),
    Column("written_through_ms", BigInteger, nullable=False),  # every record minted before it (Unix ms) is stored
    Column("heartbeat_ms", BigInteger, nullable=False),  # the writer's clock at its last contact
)


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class PredictionRecord:
    id: str
    model: str
    model_version: str
    created_at: datetime
    text_sha256: str
    top_labels: list[str]
    top_probabilities: list[float]
    token_count: int
    truncated: bool
    text: str | None = None
    document: dict | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "created_at": self.created_at.isoformat()}

    @classmethod
    def from_json(cls, payload: dict) -> "PredictionRecord":
        return cls(**{**payload, "created_at": datetime.fromisoformat(payload["created_at"])})

    def row(self) -> dict:
        return {**asdict(self), "top_label": self.top_labels[0]}


@dataclass(frozen=True)
class RecordedCorrection:
    prediction_id: str
    model: str
    verdict: str  # "correct" when correct_label is the predicted top-1, else "wrong"
    repeated: bool = False  # this very correction was already recorded: nothing new was written


@dataclass(frozen=True)
class LiveAccuracy:
    model: str
    correct: int
    corrections: int  # in the window: the most recent corrections of this model, at most the window's size

    @property
    def accuracy(self) -> float:
        return self.correct / self.corrections


@dataclass(frozen=True)
class WriterMark:
    writer: str
    model: str
    replica: str
    written_through_ms: int
    heartbeat_ms: int


def refused_by_database(error: BaseException) -> bool:
    """The database refused these rows for what they hold (a value it cannot store, a constraint),
    so sending them again can never succeed; everything else (a connection refused or lost, a
    timeout, a lock, a schema not upgraded yet) may pass on a retry."""
    if isinstance(error, (DataError, IntegrityError, ValueError, TypeError)):
        return True  # the last two: a value the driver cannot even send (NaN for strict JSON), raised as it is
    return isinstance(error, StatementError) and not isinstance(error, DBAPIError)  # ... or wrapped


_MAX_ERROR_CHARACTERS = 500


def describe_error(error: BaseException) -> str:
    """An error as a log line or a quarantine entry may carry it: the driver's own message, without
    SQLAlchemy's statement and parameters (a record's text is confidential); never a password, which
    no URL, statement or driver message here holds."""
    cause = getattr(error, "orig", None) or error
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first_line}"[:_MAX_ERROR_CHARACTERS]


# Strict JSON on both databases: PostgreSQL's json refuses NaN and Infinity, SQLite would keep them
# and hand the export files no JSON reader takes.
_strict_json = functools.partial(json.dumps, allow_nan=False)


@dataclass
class PredictionStore:
    """A connection pool to one database. Thread-safe; one per process. Creating it connects to
    nothing: the first statement does. ``password_file``: read at each new connection, so a rotated
    Secret is picked up, and never part of the URL, a log line or an error."""

    url: str
    password_file: Path | None = None
    read_only: bool = False  # a reader (the export of corrected examples): never creates or changes the database
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.url = normalized_database_url(self.url)
        parsed = make_url(self.url)
        if parsed.get_backend_name() == "sqlite":
            if self.read_only:  # SQLite's mode=ro: a missing file is an error, not a new empty database
                parsed = parsed.set(database=f"file:{quote(parsed.database)}").update_query_dict({"mode": "ro", "uri": "true"})
            else:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, json_serializer=_strict_json)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            read_only = {"options": "-c default_transaction_read_only=on"} if self.read_only else {}
            # pre-ping: a connection the database dropped while idle is replaced, not handed out.
            self.engine = create_engine(parsed, pool_size=2, max_overflow=2, pool_pre_ping=True, json_serializer=_strict_json,
                                        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, **read_only})
            if self.password_file is not None:
                event.listen(self.engine, "do_connect", self._with_password)

    def _with_password(self, _dialect, _record, _args, parameters: dict) -> None:
        try:
            parameters["password"] = Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as error:  # a connection error like any other: the writer retries, the feedback model answers UNAVAILABLE
            raise ConnectionError(f"records_password_file {self.password_file}: cannot read it: {error.strerror}") from None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def describe(self) -> str:
        """The URL as it may be logged: no password."""
        return self.engine.url.render_as_string(hide_password=True)

    # --- schema -------------------------------------------------------------------------------

    def upgrade_schema(self) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.engine.begin() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if not self.is_sqlite:
            yield  # the advisory lock, inside the migration's transaction
            return
        with open(f"{self.engine.url.database}.migration-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # WAL: readers (the feedback model, an export) never wait for a writer; persistent in the file.
                with self.engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA journal_mode=WAL")
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- what the classifier writes -----------------------------------------------------------

    def register_model(self, model: str, version: str, labels: LabelSet) -> None:
        values = {"model": model, "version": version, "labels": [[label.code, label.name] for label in labels.labels],
                  "registered_at": utc_now()}
        statement = self._insert(served_models).values(**values).on_conflict_do_update(
            index_elements=["model", "version"], set_={"labels": values["labels"], "registered_at": values["registered_at"]}
        )
        with self.engine.begin() as connection:
            connection.execute(statement)

    def insert_predictions(self, records: Sequence[PredictionRecord]) -> None:
        """Idempotent: a record already stored (replayed from the journal after a crash) is skipped."""
        if not records:
            return
        statement = self._insert(predictions).on_conflict_do_nothing(index_elements=["id"])
        with self.engine.begin() as connection:
            connection.execute(statement, [record.row() for record in records])

    def heartbeat(self, writer: str, model: str, replica: str, written_through_ms: int | None, now_ms: int) -> None:
        """The writer is alive at ``now_ms``; with ``written_through_ms``, every record it minted before
        then is stored. A writer's first row, before it has caught up, promises nothing (0)."""
        values = {"writer": writer, "model": model, "replica": replica, "written_through_ms": written_through_ms or 0,
                  "heartbeat_ms": now_ms}
        changed = {"heartbeat_ms": now_ms, **({"written_through_ms": written_through_ms} if written_through_ms is not None else {})}
        statement = self._insert(record_writers).values(**values).on_conflict_do_update(index_elements=["writer"], set_=changed)
        with self.engine.begin() as connection:
            connection.execute(statement)

    def retire_writer(self, writer: str) -> None:
        """The writer's records are all stored and it mints no more (a clean stop, a replayed orphan)."""
        with self.engine.begin() as connection:
            connection.execute(record_writers.delete().where(record_writers.c.writer == writer))

    def writer_marks(self) -> list[WriterMark]:
        with self.engine.connect() as connection:
            return [WriterMark(**row._asdict()) for row in connection.execute(record_writers.select())]

    def delete_expired(self, model: str, before: datetime) -> int:
        """Retention: the model's predictions older than ``before``, with their corrections."""
        expired = select(predictions.c.id).where(predictions.c.model == model, predictions.c.created_at < before)
        with self.engine.begin() as connection:
            connection.execute(feedback.delete().where(feedback.c.prediction_id.in_(expired)))
            return connection.execute(predictions.delete().where(predictions.c.id.in_(expired))).rowcount

    def _insert(self, table: Table):
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    # --- what the feedback model writes and reads ---------------------------------------------

    def stored_prediction_ids(self, ids: Sequence[str]) -> set[str]:
        with self.engine.connect() as connection:
            return set(connection.scalars(select(predictions.c.id).where(predictions.c.id.in_(list(ids)))))

    def record_corrections(self, corrections: Sequence[Correction]) -> list[RecordedCorrection]:
        """Check every correction, then commit them all in one transaction, or none; an error names
        the request's element (``CORRECT_LABEL[2]``). The same correction sent twice at once (a retry
        racing the first) is recorded once and both are answered alike."""
        ids = [correction.prediction_id for correction in corrections]
        with self._serialized_transaction() as connection:
            stored = {
                row.id: row
                for row in connection.execute(
                    select(predictions.c.id, predictions.c.model, predictions.c.model_version, predictions.c.top_label)
                    .where(predictions.c.id.in_(ids))
                )
            }
            corrected = {
                row.prediction_id: row for row in connection.execute(feedback.select().where(feedback.c.prediction_id.in_(ids)))
            }
            labels = self._labels_of(connection, {(row.model, row.model_version) for row in stored.values()})
            now = utc_now()
            recorded, rows = [], []
            for index, correction in enumerate(corrections):
                where_id = f"{PREDICTION_ID}[{index}]"
                prediction = stored.get(correction.prediction_id)
                if prediction is None:
                    raise InvalidInput(
                        where_id, f"no recorded prediction has the id {correction.prediction_id} (predictions are recorded "
                        "only by models serving with prediction_records on, and kept for their records_retention_days)",
                    )
                earlier = corrected.get(correction.prediction_id)
                if earlier is not None:
                    recorded.append(_repeated(index, correction, earlier))
                    continue
                codes = labels[(prediction.model, prediction.model_version)]
                if correction.correct_label not in codes:
                    raise InvalidInput(
                        f"{CORRECT_LABEL}[{index}]",
                        f"{correction.correct_label!r} is not a class of model {prediction.model} "
                        f"({len(codes)} classes: {_sample_of(codes)})",
                    )
                verdict = "correct" if correction.correct_label == prediction.top_label else "wrong"
                recorded.append(RecordedCorrection(correction.prediction_id, prediction.model, verdict))
                rows.append({**asdict(correction), "model": prediction.model, "verdict": verdict, "created_at": now})
            if not rows:
                return recorded
            # Another request may have corrected one of these since our check (PostgreSQL: the insert
            # waits for its commit, then skips the row); what it recorded decides, as a stored one does.
            insert = self._insert(feedback).on_conflict_do_nothing(index_elements=["prediction_id"]).returning(feedback.c.prediction_id)
            try:
                inserted = set(connection.execute(insert, rows).scalars())
            except IntegrityError:  # its prediction was removed meanwhile (retention): the next try finds out which
                raise ServerUnavailable("a prediction in this request changed while its correction was recorded; retry") from None
            raced = {row["prediction_id"] for row in rows} - inserted
            if raced:
                by_others = {row.prediction_id: row for row in connection.execute(feedback.select().where(feedback.c.prediction_id.in_(raced)))}
                recorded = [
                    _repeated(index, corrections[index], by_others[c.prediction_id]) if c.prediction_id in raced else c
                    for index, c in enumerate(recorded)
                ]
        return recorded

    @contextlib.contextmanager
    def _serialized_transaction(self) -> Iterator:
        """A transaction that, on SQLite, holds the write lock from its first read: WAL's deferred one
        would fail its insert at once (SQLITE_BUSY_SNAPSHOT) if another wrote since it read."""
        with self.engine.begin() as connection:
            if self.is_sqlite:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection

    def _labels_of(self, connection, models: set[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
        found = {}
        for model, version in models:
            labels = connection.scalar(
                select(served_models.c.labels).where(served_models.c.model == model, served_models.c.version == version)
            )
            found[(model, version)] = [code for code, _ in labels or []]
        return found

    def live_accuracy(self, model: str, window: int) -> LiveAccuracy | None:
        """Share of the model's last ``window`` corrections that confirmed its top-1; None before the first."""
        latest = (
            select(feedback.c.verdict).where(feedback.c.model == model)
            .order_by(feedback.c.created_at.desc()).limit(window).subquery()
        )
        with self.engine.connect() as connection:
            verdicts = list(connection.scalars(select(latest.c.verdict)))
        if not verdicts:
            return None
        return LiveAccuracy(model, verdicts.count("correct"), len(verdicts))

    def recording_models(self) -> list[str]:
        with self.engine.connect() as connection:
            return sorted(set(connection.scalars(select(served_models.c.model))))

    def count(self, table: Table, **where) -> int:
        condition = [table.c[name] == value for name, value in where.items()]
        with self.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(table).where(*condition))

    def corrected_examples(self, model: str | None = None) -> Iterator[dict]:
        """Each corrected prediction's row with its correction's label, verdict and time, oldest correction first."""
        query = (
            select(predictions, feedback.c.correct_label, feedback.c.verdict, feedback.c.examiner_id,
                   feedback.c.created_at.label("corrected_at"))
            .join(feedback, feedback.c.prediction_id == predictions.c.id)
            .order_by(feedback.c.created_at, feedback.c.prediction_id)
        )
        if model is not None:
            query = query.where(predictions.c.model == model)
        with self.engine.connect() as connection:
            for row in connection.execution_options(yield_per=500).execute(query):
                yield row._asdict()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # FULL: a commit is on disk when it returns (WAL's default NORMAL may lose the last commits
    # on a power cut), which is what "acknowledged after commit" promises.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _repeated(index: int, correction: Correction, earlier) -> RecordedCorrection:
    """The same correction again (a retry whose acknowledgement was lost, or one racing the first) is
    acknowledged again, so a client may resend safely; a different one is a second correction."""
    if (earlier.correct_label, earlier.examiner_id, earlier.comment) == (correction.correct_label, correction.examiner_id, correction.comment):
        return RecordedCorrection(correction.prediction_id, earlier.model, earlier.verdict, repeated=True)
    raise InvalidInput(
        f"{PREDICTION_ID}[{index}]", f"prediction {correction.prediction_id} already has a correction ({earlier.correct_label}, "
        f"recorded {earlier.created_at.isoformat(timespec='seconds')}Z); one correction per prediction",
    )


def _sample_of(codes: Sequence[str]) -> str:
    return ", ".join(codes) if len(codes) <= 6 else f"{', '.join(codes[:3])}, …, {codes[-1]}"
