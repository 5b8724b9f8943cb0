"""The records database, on both databases it supports: a SQLite file and a real PostgreSQL
(Debian's, started on loopback by the tests): the migrated schema, idempotent records, corrections
checked and committed whole or not at all, live accuracy, retention, and the training-data export."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest

from patent_classifier_client.corrections import export_corrected_examples
from patent_classifier_client.evaluation import read_labelled_patents
from patent_classifier_client.errors import InvalidInput
from patent_classifier_client.feedback_protocol import Correction
from core.labels import Label, LabelSet
from patent_classifier_client.patent_document import PatentDocument
from patent_classifier_client.prediction_id import new_prediction_id
from core.prediction_store import PredictionRecord, PredictionStore, feedback, predictions, utc_now
from tests.conftest import PROJECT_ROOT

LABELS = LabelSet(tuple(Label(f"C{i}", f"class {i}") for i in range(5)))
PATENT = PatentDocument(ipc=["G06F 16/35"], title="분류 장치", abstract="특허 문서를 분류한다.", claims=["1. 장치."])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.tools)])  # tools: a real PostgreSQL
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.db'}"
    return request.getfixturevalue("postgres").create_database(f"records_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(database_url):
    store = PredictionStore(database_url)
    store.upgrade_schema()
    store.register_model("m", "1", LABELS)
    yield store
    store.close()


def record(top: str = "C1", *, created=None, text: str | None = None, document: PatentDocument | None = None) -> PredictionRecord:
    return PredictionRecord(
        new_prediction_id(), "m", "1", created or utc_now(), "0" * 64, [top, "C0"], [0.7, 0.2], 12, False,
        text=text, document=document.model_dump() if document else None,
    )


def test_the_migrations_build_the_schema_the_code_declares(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from core.prediction_store import METADATA

    store = PredictionStore(database_url)
    assert store.schema_revision() is None
    store.upgrade_schema()
    store.upgrade_schema()  # at head: nothing to do
    assert store.schema_revision() == "0002"
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), METADATA)
    store.close()
    assert differences == []


def test_stubs_that_start_together_upgrade_the_schema_once(database_url):
    """Every recording model and the feedback model upgrade the schema when they load, in their own
    processes and at the same moment: the lock makes one of them do it and the others find it done."""
    script = f"from core.prediction_store import PredictionStore; PredictionStore({database_url!r}).upgrade_schema()"
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, stderr=subprocess.PIPE) for _ in range(4)]
    failures = [process.stderr.read().decode() for process in processes if process.wait(timeout=120) != 0]
    assert failures == []
    assert PredictionStore(database_url).schema_revision() == "0002"


def test_a_record_stored_twice_is_stored_once(store):
    first, second = record(), record()
    store.insert_predictions([first])
    store.insert_predictions([first, second])  # a journal replayed after a crash
    assert store.stored_prediction_ids([first.id, second.id, new_prediction_id()]) == {first.id, second.id}
    assert store.count(predictions) == 2


def test_corrections_are_checked_then_committed_whole_or_not_at_all(store):
    confirmed, corrected, other = record("C1"), record("C1"), record("C2")
    store.insert_predictions([confirmed, corrected, other])

    with pytest.raises(InvalidInput) as error:
        store.record_corrections([Correction(confirmed.id, "C1"), Correction(other.id, "C9")])
    assert error.value.field == "CORRECT_LABEL[1]"
    assert "'C9' is not a class of model m (5 classes: C0, C1, C2, C3, C4)" in error.value.problem
    assert store.count(feedback) == 0  # the good one was not recorded either

    recorded = store.record_corrections([
        Correction(confirmed.id, "C1", examiner_id="e-1"), Correction(corrected.id, "C3", comment="청구항 1 참조"),
    ])
    assert [(c.prediction_id, c.model, c.verdict) for c in recorded] == [(confirmed.id, "m", "correct"), (corrected.id, "m", "wrong")]

    with pytest.raises(InvalidInput) as error:
        store.record_corrections([Correction(other.id, "C2"), Correction(corrected.id, "C4")])
    assert error.value.field == "PREDICTION_ID[1]"
    assert f"prediction {corrected.id} already has a correction (C3, recorded " in error.value.problem
    # The very same correction again (a retry whose acknowledgement was lost) is acknowledged, not stored twice.
    again = store.record_corrections([Correction(corrected.id, "C3", comment="청구항 1 참조")])
    assert [(c.verdict, c.repeated) for c in again] == [("wrong", True)]
    never_recorded = new_prediction_id()
    with pytest.raises(InvalidInput) as error:
        store.record_corrections([Correction(never_recorded, "C1")])
    assert (error.value.field, error.value.problem.split(" (")[0]) == (
        "PREDICTION_ID[0]", f"no recorded prediction has the id {never_recorded}"
    )
    assert store.count(feedback) == 2
    assert store.count(feedback, verdict="wrong") == 1


def test_live_accuracy_is_the_share_confirmed_among_the_latest_corrections(store):
    assert store.live_accuracy("m", window=3) is None
    records = [record("C1", created=utc_now() - timedelta(minutes=5 - i)) for i in range(5)]
    store.insert_predictions(records)
    for index, label in enumerate(["C1", "C1", "C0", "C0", "C1"]):  # correct, correct, wrong, wrong, correct
        store.record_corrections([Correction(records[index].id, label)])
    latest = store.live_accuracy("m", window=3)
    assert (latest.correct, latest.corrections) == (1, 3)
    assert latest.accuracy == pytest.approx(1 / 3)
    assert store.live_accuracy("m", window=100).accuracy == pytest.approx(3 / 5)


def test_retention_removes_old_predictions_with_their_corrections(store):
    old, recent = record(created=utc_now() - timedelta(days=40)), record()
    store.insert_predictions([old, recent])
    store.record_corrections([Correction(old.id, "C2"), Correction(recent.id, "C2")])
    assert store.delete_expired("m", utc_now() - timedelta(days=30)) == 1
    assert store.stored_prediction_ids([old.id, recent.id]) == {recent.id}
    assert store.count(feedback) == 1


def test_the_export_writes_the_fine_tunes_format_where_the_text_was_kept(store, database_url, tmp_path):
    as_document = record("C1", text=PATENT.render(), document=PATENT)
    as_text = record("C1", text="IPC: A61K\n발명의 명칭: 조성물")
    hash_only = record("C1")
    uncorrected = record("C1", text="never corrected")
    store.insert_predictions([as_document, as_text, hash_only, uncorrected])
    store.record_corrections([Correction(as_document.id, "C3"), Correction(as_text.id, "C1"), Correction(hash_only.id, "C4")])

    out = tmp_path / "corrected.jsonl"
    counts = export_corrected_examples(database_url, out)

    assert (counts.written, counts.without_text) == (2, 1)
    lines = sorted((json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()), key=lambda line: line["label"])
    assert lines == [  # one transaction corrected both: their order is not defined
        {"text": "IPC: A61K\n발명의 명칭: 조성물", "label": "C1"},
        {"ipc": ["G06F 16/35"], "title": "분류 장치", "abstract": "특허 문서를 분류한다.", "claims": ["1. 장치."], "label": "C3"},
    ]
    # `make eval` reads the same file: corrected examples are a labelled set too.
    samples = {sample.label: sample for sample in read_labelled_patents(out)}
    assert samples["C3"].model_input() == PATENT.render()
    assert export_corrected_examples(database_url, out, model="another").written == 0
