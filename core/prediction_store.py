"""Prediction records and examiners' corrections in a SQL database, through SQLAlchemy 2.

One schema for SQLite (a file: the default, nothing to start) and PostgreSQL (by URL, for
production), created and upgraded by the Alembic migrations in ``core/prediction_migrations``:
``PredictionStore.upgrade_schema`` runs them, and every model that records predictions calls it
when it loads, under a lock (a file lock for SQLite, an advisory lock for PostgreSQL), so the
several Triton stubs that start at once upgrade it exactly once.

    served_models  (model, version) → its classes, so a correction can be checked against them
    predictions    one row per classified document: id, model, version, time, SHA-256 of the
                   rendered text, the text and structured document only when configured, top-k
    feedback       at most one correction per prediction: the class the examiner says is right,
                   verdict (correct: it is the predicted top-1; wrong), examiner id, comment, time

Times are UTC, stored without a zone (SQLite has none).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

from sqlalchemy import (
    JSON, Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text, create_engine,
    event, func, select, text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

from core.errors import InvalidInput
from core.feedback_protocol import CORRECT_LABEL, PREDICTION_ID, Correction
from core.labels import LabelSet
from core.serving_config import normalized_database_url

log = logging.getLogger("patent_classifier.records")

MIGRATIONS = Path(__file__).resolve().parent / "prediction_migrations"
# Any fixed 64-bit number: the advisory lock that serialises schema upgrades on PostgreSQL.
_PG_MIGRATION_LOCK = 0x7063_7265_636F_7264  # "pcrecord"
SQLITE_BUSY_TIMEOUT_S = 30.0

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


@dataclass
class PredictionStore:
    """A connection pool to one database. Thread-safe; one per process."""

    url: str
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
            self.engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            read_only = {"options": "-c default_transaction_read_only=on"} if self.read_only else {}
            # pre-ping: a connection the database dropped while idle is replaced, not handed out.
            self.engine = create_engine(parsed, pool_size=2, max_overflow=2, pool_pre_ping=True,
                                        connect_args={"connect_timeout": 10, **read_only})

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def describe(self) -> str:
        """The URL as it may be logged: no password."""
        return self.engine.url.render_as_string(hide_password=True)

    # --- schema -------------------------------------------------------------------------------

    @classmethod
    def prepared(cls, url: str, register: tuple[str, str, LabelSet] | None = None) -> "PredictionStore":
        """A store on ``url`` with its schema upgraded (and ``register``'s model, version and labels
        registered), ready for a server; else RuntimeError naming the database, the store closed."""
        store = cls(url)
        try:
            store.upgrade_schema()
            if register is not None:
                store.register_model(*register)
        except Exception as error:
            store.close()
            raise RuntimeError(f"records_database {store.describe()}: cannot prepare the records database: {error}") from None
        return store

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
        the request's element (``CORRECT_LABEL[2]``)."""
        ids = [correction.prediction_id for correction in corrections]
        with self.engine.begin() as connection:
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
                    # The same correction again (a retry whose acknowledgement was lost) is acknowledged
                    # again, so a client may resend safely; a different one is a second correction.
                    if (earlier.correct_label, earlier.examiner_id, earlier.comment) == (
                        correction.correct_label, correction.examiner_id, correction.comment
                    ):
                        recorded.append(RecordedCorrection(correction.prediction_id, earlier.model, earlier.verdict, repeated=True))
                        continue
                    raise InvalidInput(
                        where_id, f"prediction {correction.prediction_id} already has a correction ({earlier.correct_label}, "
                        f"recorded {earlier.created_at.isoformat(timespec='seconds')}Z); one correction per prediction",
                    )
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
            try:
                if rows:
                    connection.execute(feedback.insert(), rows)
            except IntegrityError:
                # Another request corrected one of these between our check and our insert.
                raise InvalidInput(PREDICTION_ID, "a prediction in this request was corrected by another "
                                   "request at the same moment; one correction per prediction") from None
        return recorded

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


def _sample_of(codes: Sequence[str]) -> str:
    return ", ".join(codes) if len(codes) <= 6 else f"{', '.join(codes[:3])}, …, {codes[-1]}"
