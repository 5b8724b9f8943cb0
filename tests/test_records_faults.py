"""Faults of the records database contained (docs/operations.md, "Faults contained"): classification
never waits for it nor fails because of it; a forged id, a refused record, a writer backing off,
two identical corrections at once and a control character each get the answer they should, and
nothing is retried forever. Without Triton: the recorder and the feedback service themselves, on
SQLite and on a real PostgreSQL (Debian's, on loopback) stopped and started on purpose. Through
the real server: tests/test_records_outage.py."""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from benchmarks.postgres_server import PostgresServer
from core.engine import DocumentScores
from patent_classifier_client.errors import InvalidInput, ServerUnavailable
from patent_classifier_client.feedback_protocol import Correction, decode_corrections, encode_corrections
from patent_classifier_client.prediction_id import minted_at, new_prediction_id
from core.prediction_store import PredictionStore, feedback, predictions, served_models
from core.serving_config import FeedbackConfig, ServingConfig
from server.feedback_service import FeedbackService
from server.prediction_records import PredictionJournal, PredictionRecorder, prediction_recorder
from tests import waiting
from tests.test_prediction_records import LABELS, PATENTS, SCORES, recorder, sqlite_store

WRITE_TIMEOUT_S = 60
PENDING_WAIT_S = 1.0
FORGED_ID = "ffffffff-ffff-7fff-bfff-ffffffffffff"  # a valid UUID version 7, "minted" in the year 10889

wait_until = functools.partial(waiting.wait_until, timeout_s=WRITE_TIMEOUT_S)


@pytest.fixture(scope="module")
def database():
    """A PostgreSQL of this module's own: tests stop and start it; each leaves it running."""
    with PostgresServer() as running:
        yield running


def fresh_database(server: PostgresServer) -> str:
    return server.create_database(f"records_{uuid.uuid4().hex[:12]}")


def recorded_prediction(server: PostgresServer, tmp_path: Path):
    """A fresh records database on ``server``, a running writer, and one prediction it has stored."""
    url = fresh_database(server)
    store = PredictionStore(url)
    store.upgrade_schema()
    store.register_model("m", "1", LABELS)
    writer = recorder(store, tmp_path / "journal")
    answer = writer.record([PATENTS[0].render()], None, SCORES[:1], top_k=2)
    wait_until(lambda: store.stored_prediction_ids(answer), "the prediction recorded")
    return url, store, writer, answer[0]


def serving(url: str, journal: Path, **fields) -> ServingConfig:
    return ServingConfig(model_dir=Path("model"), max_length=64, prediction_records="hash", records_database=url,
                         records_journal=journal, **fields)


def submitted(service: FeedbackService, corrections: list[Correction]) -> list[str]:
    return [verdict.decode() for verdict in service.submit(encode_corrections(corrections))["VERDICT"]]


def answered_within(seconds: float, call):
    """``call()``'s result or the error it raised, or a failure when it is still running after ``seconds``."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call()
        except Exception as error:
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"no answer within {seconds:.1f} s"
    return outcome, time.monotonic() - started


class Switchable(PredictionStore):
    """A real SQLite store whose inserts a test turns away as a database that is away would (the
    error a lost connection raises), and counts: what it refuses is what the test says it did."""

    def __init__(self, url: str):
        super().__init__(url)
        self.away = False
        self.calls: list[int] = []  # records per insert call
        self._since_back, self._failing_call = 0, None

    def back(self, failing_call: int | None = None) -> None:
        """Inserts go through again; with ``failing_call``, that one (counted from now, from 1) fails, once."""
        self._since_back, self._failing_call = 0, failing_call
        self.away = False

    def insert_predictions(self, records):
        self.calls.append(len(records))
        if not self.away:
            self._since_back += 1
        if self.away or self._since_back == self._failing_call:
            raise OperationalError("INSERT INTO predictions", {}, ConnectionError("server closed the connection unexpectedly"))
        super().insert_predictions(records)


def switchable_store(tmp_path: Path) -> Switchable:
    store = Switchable(f"sqlite:///{tmp_path / 'records.db'}")
    store.upgrade_schema()
    store.register_model("m", "1", LABELS)
    return store


# --- 1. classification never waits for, nor fails because of, the records database ------------------


@pytest.mark.tools
def test_a_model_loads_and_journals_while_the_database_is_away_and_its_records_arrive_when_it_is_back(database, tmp_path):
    url = fresh_database(database)  # its schema not even created: the writer does that once it reaches it
    database.stop()
    try:
        started = time.monotonic()
        running = prediction_recorder(serving(url, tmp_path / "journal"), "m", "1", "m_0", LABELS)
        ids = running.record([p.render() for p in PATENTS], PATENTS, SCORES, top_k=2)
        assert time.monotonic() - started < 5  # nothing waited on the database (PostgreSQL refuses at once on loopback)
        wait_until(lambda: running.stats().failures["database"] >= 2, "failed attempts counted")
        assert running.stats().pending == 3
    finally:
        database.start()
    store = PredictionStore(url)
    wait_until(lambda: running.stats().written == 3, "the records written once the database is back")
    assert store.stored_prediction_ids(ids) == set(ids)
    with store.engine.connect() as connection:
        assert connection.execute(select(served_models.c.model, served_models.c.version)).all() == [("m", "1")]
    assert running.stats().failures["quarantined"] == 0  # an absent database sets nothing aside
    running.stop()
    store.close()


@pytest.mark.tools
def test_the_feedback_service_loads_without_the_database_answers_unavailable_and_recovers_without_a_reload(database, tmp_path):
    url, store, writer, answer = recorded_prediction(database, tmp_path)
    database.stop()
    try:
        service = FeedbackService(FeedbackConfig(records_database=url, pending_wait_s=PENDING_WAIT_S))
        with pytest.raises(ServerUnavailable, match="the records database cannot take corrections now; retry"):
            submitted(service, [Correction(answer, "C1")])
    finally:
        database.start()
    assert submitted(service, [Correction(answer, "C1")]) == ["correct"]  # the same service: no reload
    writer.stop()
    service.close()


# --- 2. waits bounded by the server's clock ----------------------------------------------------------


def test_a_forged_id_is_answered_within_pending_wait_s(tmp_path):
    store = sqlite_store(tmp_path)
    service = FeedbackService(FeedbackConfig(records_database=store.url, pending_wait_s=PENDING_WAIT_S))
    outcome, seconds = answered_within(PENDING_WAIT_S + 1, lambda: submitted(service, [Correction(FORGED_ID, "C1")]))
    error = outcome.get("error")
    assert isinstance(error, InvalidInput) and error.field == "PREDICTION_ID[0]", outcome
    assert "no server minted it" in error.problem
    print(f"\nforged id answered in {seconds:.3f} s: {error}")


# --- 3. a record the database refuses is set aside; the ones after it go on --------------------------


def poisoned_line(database_kind: str) -> bytes:
    """A journal line each database refuses: SQLite a NULL where the schema says NOT NULL; PostgreSQL,
    besides, a NaN in JSON (which its json type refuses and SQLite would keep)."""
    record = {"id": new_prediction_id(), "model": "m", "model_version": "1", "created_at": "2026-12-06T00:00:00",
              "text_sha256": "0" * 64, "top_labels": ["C1"], "top_probabilities": [0.5], "token_count": 3, "truncated": False,
              "text": None, "document": None}
    if database_kind == "sqlite":
        record["text_sha256"] = None
        return (json.dumps(record) + "\n").encode()
    return (json.dumps(record).replace("[0.5]", "[NaN]") + "\n").encode()


@pytest.mark.parametrize("database_kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.tools)])
def test_a_record_the_database_refuses_is_set_aside_while_the_next_1000_arrive(database_kind, tmp_path, request):
    if database_kind == "sqlite":
        store = sqlite_store(tmp_path)
    else:
        store = PredictionStore(fresh_database(request.getfixturevalue("database")))
        store.upgrade_schema()
        store.register_model("m", "1", LABELS)
    running = recorder(store, tmp_path / "journal")
    poison = poisoned_line(database_kind)
    running.journal.append(poison, 1)
    ids = [i for _ in range(250) for i in running.record([p.render() for p in PATENTS[:2]], None, SCORES[:2], top_k=2)] + \
        [i for _ in range(500) for i in running.record([PATENTS[2].render()], None, SCORES[2:], top_k=2)]
    assert len(ids) == 1000
    wait_until(lambda: store.stored_prediction_ids(ids) == set(ids), "the 1,000 records after the refused one")
    wait_until(lambda: running.stats().pending == 0, "the journal emptied")
    stats = running.stats()
    assert stats.failures == {"journal": 0, "database": 0, "quarantined": 1}
    set_aside = [json.loads(line) for line in running.quarantine_path.read_text(encoding="utf-8").splitlines()]
    assert [entry["line"] for entry in set_aside] == [poison.decode().rstrip("\n")]
    assert ("IntegrityError" if database_kind == "sqlite" else "ValueError") in set_aside[0]["error"], set_aside
    running.stop()


def test_a_non_finite_probability_is_journaled_as_json_every_database_takes(tmp_path):
    store = sqlite_store(tmp_path)
    running = recorder(store, tmp_path / "journal")
    running.stop()  # the line stays in the journal to be read
    scores = [DocumentScores(np.array([np.nan, 0.6, np.inf, 0.1], dtype=np.float32), 12, False)]
    running.journal = PredictionJournal(running.journal_path)
    running.record(["텍스트"], None, scores, top_k=4)
    line = running.journal_path.read_bytes().splitlines()[-1]

    def no_constants(name):
        raise AssertionError(f"the journal holds {name}, which JSON has not")

    assert json.loads(line, parse_constant=no_constants)["top_probabilities"].count(None) == 2


def test_an_orphaned_journal_is_replayed_chunk_by_chunk(tmp_path, monkeypatch):
    """Never read whole into memory nor written in one transaction: a crashed server's journal may
    be gigabytes."""
    import server.prediction_records as prediction_records

    monkeypatch.setattr(prediction_records, "MAX_BATCH_BYTES", 4096)
    store, folder = switchable_store(tmp_path), tmp_path / "journal"
    left_behind = PredictionRecorder(store, "m", "1", LABELS, folder, "m_1", keep_text=False)
    left_behind.journal = PredictionJournal(left_behind.journal_path)  # journaled, its writer never started
    orphan_ids = [i for _ in range(100) for i in left_behind.record([p.render() for p in PATENTS], None, SCORES, top_k=2)]
    left_behind.journal.close()
    size = left_behind.journal_path.stat().st_size

    adopter = recorder(store, folder, "m_0")
    wait_until(lambda: not left_behind.journal_path.exists(), "the orphan replayed and removed")
    assert store.stored_prediction_ids(orphan_ids) == set(orphan_ids)
    line_bytes = size // len(orphan_ids)
    assert len(store.calls) >= size // 4096 and max(store.calls) <= 4096 // line_bytes + 1, store.calls
    adopter.stop()


# --- 4. a correction of a record on its way is told to retry, never "unknown" ------------------------


@pytest.mark.tools
def test_a_correction_of_a_journaled_record_not_yet_written_gets_a_retryable_answer(database, tmp_path):
    url, store, writer, _ = recorded_prediction(database, tmp_path)
    service = FeedbackService(FeedbackConfig(records_database=url, pending_wait_s=PENDING_WAIT_S))
    with psycopg.connect(url) as holder:
        # The writer's next insert waits, as one backing off after a blip would not have written yet;
        # reads go on, so the feedback model sees the database and not the record.
        holder.execute("LOCK TABLE predictions IN EXCLUSIVE MODE")
        journaled = writer.record([PATENTS[1].render()], None, SCORES[1:2], top_k=2)
        outcome, seconds = answered_within(PENDING_WAIT_S + 5, lambda: submitted(service, [Correction(journaled[0], "C1")]))
        holder.rollback()
    error = outcome.get("error")
    assert isinstance(error, ServerUnavailable), outcome
    assert f"the record of prediction {journaled[0]} has not reached the records database yet" in str(error)
    assert seconds >= PENDING_WAIT_S  # it waited for the record first, by the server's clock
    wait_until(lambda: store.stored_prediction_ids(journaled), "the record written once the lock is gone")
    assert submitted(service, [Correction(journaled[0], "C1")]) == ["correct"]  # the client's retry succeeds
    # An id no recording model minted, once every writer's watermark has passed it: permanently unknown.
    never_recorded = new_prediction_id()
    wait_until(lambda: min(mark.written_through_ms for mark in store.writer_marks()) > minted_at(never_recorded) * 1000,
               "the writer's watermark past the id")
    outcome, _ = answered_within(PENDING_WAIT_S + 5, lambda: submitted(service, [Correction(never_recorded, "C1")]))
    assert isinstance(outcome.get("error"), InvalidInput) and "no recorded prediction has the id" in str(outcome["error"]), outcome
    writer.stop()
    service.close()


def test_a_writer_watermark_never_passes_a_record_it_has_not_written(tmp_path):
    """The watermark's promise, "every record minted before it is stored", with records minted while
    others are being journaled and written."""
    store = switchable_store(tmp_path)
    running = recorder(store, tmp_path / "journal")
    store.away = True
    ids = [i for _ in range(20) for i in running.record([p.render() for p in PATENTS], None, SCORES, top_k=2)]
    wait_until(lambda: running.stats().failures["database"] >= 1, "a failed write")
    assert running.journal.watermark_ms() <= min(minted_at(i) * 1000 for i in ids)
    store.back()
    wait_until(lambda: running.stats().pending == 0, "the journal written")
    assert running.journal.watermark_ms() >= max(minted_at(i) * 1000 for i in ids)
    running.stop()


# --- 5. identical corrections at once, and control characters ----------------------------------------


@pytest.mark.tools
def test_two_identical_corrections_at_once_both_get_the_same_verdict(database, tmp_path):
    url, store, writer, answer = recorded_prediction(database, tmp_path)
    replicas = [FeedbackService(FeedbackConfig(records_database=url)) for _ in range(2)]  # a retry lands on another replica
    correction = [Correction(answer, "C2", examiner_id="e-7")]
    outcomes: list = [None, None]

    def correct(index: int) -> None:
        try:
            outcomes[index] = submitted(replicas[index], correction)
        except Exception as error:
            outcomes[index] = error

    with psycopg.connect(url) as holder:
        # Both read the table, find no correction and reach their insert, where they wait together.
        holder.execute("LOCK TABLE feedback IN EXCLUSIVE MODE")
        threads = [threading.Thread(target=correct, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        waiting_inserts = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'feedback'::regclass"
        with psycopg.connect(url) as observer:
            wait_until(lambda: observer.execute(waiting_inserts).fetchone()[0] == 2, "both inserts waiting")
        holder.rollback()
    for thread in threads:
        thread.join(WRITE_TIMEOUT_S)
    assert outcomes == [["wrong"], ["wrong"]]
    assert store.count(feedback, prediction_id=answer) == 1
    writer.stop()
    for replica in replicas:
        replica.close()


@pytest.mark.parametrize("field, value, words", [
    ("examiner_id", "e-\x007", "EXAMINER_ID[0]: holds the control character U+0000 at position 2"),
    ("comment", "보류\x1b[31m", "COMMENT[0]: holds the control character U+001B at position 2"),
    ("correct_label", "C1\x7f", "CORRECT_LABEL[0]: holds the control character U+007F at position 2"),
])
def test_a_control_character_in_a_correction_is_invalid_input_naming_the_field(field, value, words):
    fields = {"correct_label": "C1", field: value}
    with pytest.raises(InvalidInput) as error:
        decode_corrections(encode_corrections([Correction(new_prediction_id(), **fields)]))
    assert str(error.value) == words + "; send plain text"
    # A comment's own line breaks and tabs are text.
    assert decode_corrections(encode_corrections([Correction(new_prediction_id(), "C1", comment="1행\n\t2행")]))[0].comment == "1행\n\t2행"


@pytest.mark.tools
def test_a_nul_in_a_correction_is_permanent_on_postgresql_never_retry(database, tmp_path):
    url, store, writer, answer = recorded_prediction(database, tmp_path)
    service = FeedbackService(FeedbackConfig(records_database=url))
    with pytest.raises(InvalidInput, match=r"COMMENT\[0\]"):
        submitted(service, [Correction(answer, "C1", comment="a\x00b")])
    writer.stop()
    service.close()


# --- 9. the pending count, the journal's bound ------------------------------------------------------


def test_the_pending_count_stays_exact_when_a_write_pass_fails_midway(tmp_path, monkeypatch):
    import server.prediction_records as prediction_records

    monkeypatch.setattr(prediction_records, "MAX_BATCH_BYTES", 2048)  # the journal is read in several chunks
    store = switchable_store(tmp_path)
    running = recorder(store, tmp_path / "journal")
    store.away = True
    ids = [i for _ in range(20) for i in running.record([p.render() for p in PATENTS], None, SCORES, top_k=2)]
    wait_until(lambda: running.stats().failures["database"] >= 1, "a failed write")
    calls_before = len(store.calls)
    store.back(failing_call=2)  # the next pass writes its first chunk, then fails
    seen = []
    wait_until(lambda: seen.append(running.stats().pending) or running.stats().pending == 0, "the journal written")
    assert len(store.calls) > calls_before + 2  # the failure came midway through a pass, as the test means
    assert min(seen) >= 0
    assert running.stats().written == len(ids) == 60
    assert store.stored_prediction_ids(ids) == set(ids)
    running.stop()


def test_the_journal_has_a_bound_past_which_records_are_dropped_and_counted_and_answers_go_out(tmp_path, caplog):
    store = switchable_store(tmp_path)
    store.away = True
    bound = 4096
    running = PredictionRecorder(store, "m", "1", LABELS, tmp_path / "journal", "m_0", keep_text=False,
                                 flush_interval_s=0.05, max_journal_bytes=bound)
    running.start()
    with caplog.at_level(logging.ERROR, logger="patent_classifier.records"):
        ids = [i for _ in range(40) for i in running.record([p.render() for p in PATENTS], None, SCORES, top_k=2)]
    assert len(set(ids)) == 120  # every answer got its ids
    stats = running.stats()
    assert stats.journal_bytes <= bound and stats.journal_limit_bytes == bound
    assert stats.failures["journal"] > 0 and stats.failures["journal"] + stats.pending == 120
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1  # once per spell, not per answer
    journaled = stats.pending
    store.back()
    wait_until(lambda: running.stats().written == journaled, "the journaled records written")
    after = running.record([PATENTS[0].render()], None, SCORES[:1], top_k=2)
    wait_until(lambda: store.stored_prediction_ids(after), "records journaled again once there is room")
    running.stop()


# --- records settings at serve time --------------------------------------------------------------------


def test_records_settings_come_from_the_environment_and_config_pbtxt_holds_no_path_of_the_export(tmp_path):
    from export.triton_package import relative_records_paths, write_feedback_model, write_triton_model

    served = tmp_path / "serving"
    repository = served / "model_repository"
    config = serving(f"sqlite:///{served / 'build' / 'records.db'}", served / "build" / "journal")
    write_triton_model(repository, "m", config)
    write_feedback_model(repository, FeedbackConfig(records_database=config.records_database))
    written = {name: (repository / name / "config.pbtxt").read_text() for name in ("m", "feedback")}
    assert all(str(tmp_path) not in text for text in written.values()), written
    assert 'string_value: "sqlite:///build/records.db"' in written["m"] and 'string_value: "build/journal"' in written["m"]

    # Moved to another machine: the relative paths resolve against the folder holding the repository.
    moved = tmp_path / "elsewhere"
    served.rename(moved)
    parameters = {key: {"string_value": value} for key, value in relative_records_paths(config, served).to_triton_parameters().items()}
    version_dir = moved / "model_repository" / "m" / "1"
    loaded = ServingConfig.from_triton_parameters(parameters, version_dir, environ={})
    assert (loaded.records_database, loaded.records_journal) == (f"sqlite:///{moved / 'build' / 'records.db'}", moved / "build" / "journal")
    assert loaded.replica  # the host name, when the environment names no replica

    environ = {"PATENT_CLASSIFIER_RECORDS_DATABASE": "postgresql://classifier@db.internal:5432/records",
               "PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE": "/var/run/secrets/records/password",
               "PATENT_CLASSIFIER_RECORDS_JOURNAL": "/var/lib/journal", "PATENT_CLASSIFIER_REPLICA": "classifier-7f9c-x2"}
    pod = ServingConfig.from_triton_parameters(parameters, version_dir, environ=environ)
    assert (pod.records_database, pod.records_password_file, pod.records_journal, pod.replica) == (
        "postgresql+psycopg://classifier@db.internal:5432/records", Path("/var/run/secrets/records/password"),
        Path("/var/lib/journal"), "classifier-7f9c-x2")
    feedback_config = FeedbackConfig.from_triton_parameters(
        {key: {"string_value": value} for key, value in FeedbackConfig(records_database="sqlite:///build/records.db").to_triton_parameters().items()},
        moved / "model_repository" / "feedback" / "1", environ=environ)
    assert (feedback_config.records_database, feedback_config.records_password_file) == (pod.records_database, pod.records_password_file)
    with pytest.raises(ValueError, match=r"PATENT_CLASSIFIER_REPLICA \(replica\): .*it must be a pod or host name"):
        ServingConfig.from_triton_parameters(parameters, version_dir, environ={"PATENT_CLASSIFIER_REPLICA": "a/b"})


def test_a_password_in_the_records_url_is_refused_without_repeating_it():
    with pytest.raises(ValueError) as error:
        FeedbackConfig.from_triton_parameters({"records_database": {"string_value": "postgresql://pc:s3cr3t-pw@db/records"}},
                                              Path("/srv/model_repository/feedback/1"), environ={})
    assert "records_database: Value error, holds a password" in str(error.value) and "s3cr3t-pw" not in str(error.value)


@pytest.mark.tools
def test_the_password_is_read_from_its_file_at_connect_time_and_never_logged_nor_answered(tmp_path, caplog):
    secret = "pw-" + uuid.uuid4().hex
    with PostgresServer(password=secret) as protected:
        url = protected.create_database("records")
        password_file = tmp_path / "password"
        password_file.write_text(secret + "\n")  # as a mounted Secret may end
        environ = {"PATENT_CLASSIFIER_RECORDS_DATABASE": url, "PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE": str(password_file)}
        config = ServingConfig.from_triton_parameters(
            {key: {"string_value": value} for key, value in serving("sqlite:///records.db", Path("journal")).to_triton_parameters().items()},
            tmp_path / "model_repository" / "m" / "1", environ=environ)
        with caplog.at_level(logging.INFO):
            running = prediction_recorder(config, "m", "1", "m_0", LABELS)
            ids = running.record([PATENTS[0].render()], None, SCORES[:1], top_k=2)
            wait_until(lambda: running.stats().written == 1, "the record written with the password from the file")
            store = PredictionStore(url, password_file=password_file)
            assert store.stored_prediction_ids(ids) == set(ids)
            password_file.write_text("wrong-" + secret)  # a rotated Secret that does not match: connections fail, quietly
            store.close()
            refused = FeedbackService(FeedbackConfig(records_database=url, records_password_file=password_file))
            with pytest.raises(ServerUnavailable) as error:
                submitted(refused, [Correction(ids[0], "C1")])
            running.stop()
        assert secret not in str(error.value)
        assert secret not in caplog.text and "password authentication failed" in caplog.text
