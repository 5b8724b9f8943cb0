"""Examiners' corrections through the real server, the way the office uses it: classify, correct
through the feedback model (gRPC, HTTP, the CLI), then find the records and corrections in the
database (the session server's SQLite file), the metrics moved, and the corrected examples in the
export. Bad corrections get an error naming the field, and the server serves on."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from patent_classifier_client import AsyncPatentClassifier, Correction, InvalidInput, PatentClassifier
from patent_classifier_client.evaluation import read_labelled_patents
from patent_classifier_client import feedback_protocol
from patent_classifier_client.errors import ModelNotFound
from patent_classifier_client.prediction_id import new_prediction_id
from core.prediction_store import PredictionStore, feedback, predictions
from core.synthetic_patents import synthetic_patents
from tests.conftest import MODEL_NAME, PROJECT_ROOT, TIGHT_MODEL_NAME
from tests.test_monitoring import metrics_after, scrape, value

pytestmark = pytest.mark.server  # classify and correct through the real tritonserver



@pytest.fixture(scope="module")
def store(exported):
    store = PredictionStore(exported.records_database)
    yield store
    store.close()


def rows(store, table, ids) -> dict:
    key = table.c.id if table is predictions else table.c.prediction_id
    with store.engine.connect() as connection:
        return {row[0]: row._asdict() for row in connection.execute(table.select().where(key.in_(list(ids))))}


def test_classify_correct_then_the_database_the_metrics_and_the_export_have_it(server, exported, store, tmp_path):
    patents = synthetic_patents(3, seed=71, long_share=0.0)
    before, _ = scrape(server.metrics_url)
    with PatentClassifier(server.grpc_url, protocol="grpc", model=MODEL_NAME) as grpc_client, \
            PatentClassifier(server.http_url, protocol="http", model=MODEL_NAME) as http_client:
        answers = grpc_client.classify_batch(patents)
        as_text = http_client.classify(patents[0].render() + "\n(재출원)")
        # Right after the answers: the feedback model waits for records still on their way.
        confirmed = grpc_client.submit_feedback(answers[0].prediction_id, answers[0].labels[0].code, examiner_id="e-17")
        corrected = http_client.submit_feedback(answers[1].prediction_id, answers[1].labels[2].code, comment="청구항 1은 소재에 관한 것")
    assert (confirmed, corrected) == ("correct", "wrong")
    corrections_file = tmp_path / "corrections.jsonl"
    corrections_file.write_text(
        json.dumps({"prediction_id": answers[2].prediction_id, "label": answers[2].labels[1].code, "examiner_id": "e-3"}) + "\n"
        + json.dumps({"prediction_id": as_text.prediction_id, "label": as_text.labels[0].code}) + "\n",
        encoding="utf-8",
    )
    submitted = subprocess.run(
        [sys.executable, "-m", "patent_classifier_client", "feedback", "submit", "--input", str(corrections_file), "--url", server.grpc_url],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    expected_verdicts = [
        {"line": 1, "prediction_id": answers[2].prediction_id, "verdict": "wrong"},
        {"line": 2, "prediction_id": as_text.prediction_id, "verdict": "correct"},
    ]
    assert submitted.returncode == 0, submitted.stderr
    assert [json.loads(line) for line in submitted.stdout.splitlines()] == expected_verdicts
    # The file sent again, as after an interrupted run: the same corrections are acknowledged again, recorded once.
    resent = subprocess.run(submitted.args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert resent.returncode == 0 and [json.loads(line) for line in resent.stdout.splitlines()] == expected_verdicts

    # The database: a record per answer, with its text (this model records text), and each correction.
    everything = answers + [as_text]
    ids = [answer.prediction_id for answer in everything]
    assert len(set(ids)) == 4
    recorded = rows(store, predictions, ids)
    texts = [patent.render() for patent in patents] + [patents[0].render() + "\n(재출원)"]
    for answer, text, document in zip(everything, texts, patents + [None]):
        row = recorded[answer.prediction_id]
        assert row["model"] == MODEL_NAME and row["model_version"] == "1"
        assert row["text_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
        assert row["text"] == text
        assert row["document"] == (document.model_dump() if document else None)
        assert row["top_labels"] == [label.code for label in answer.labels]
        assert row["top_probabilities"] == pytest.approx([label.probability for label in answer.labels], rel=1e-6)
        assert (row["token_count"], row["truncated"]) == (answer.token_count, answer.truncated)
    stored = rows(store, feedback, ids)
    assert {i: (r["verdict"], r["correct_label"], r["examiner_id"]) for i, r in stored.items()} == {
        answers[0].prediction_id: ("correct", answers[0].labels[0].code, "e-17"),
        answers[1].prediction_id: ("wrong", answers[1].labels[2].code, None),
        answers[2].prediction_id: ("wrong", answers[2].labels[1].code, "e-3"),
        as_text.prediction_id: ("correct", as_text.labels[0].code, None),
    }
    assert stored[answers[1].prediction_id]["comment"] == "청구항 1은 소재에 관한 것"

    # The metrics: confidence per answered document, records written, corrections by verdict, live accuracy.
    after, delta = metrics_after(server.metrics_url, before, lambda d: d("pc_feedback_total") >= 4 and d("pc_prediction_records_written_total") >= 4)
    assert delta("pc_feedback_total", verdict="correct") == 2
    assert delta("pc_feedback_total", verdict="wrong") == 2
    assert delta("pc_top_class_probability_ratio_count") == 4
    # The same float32 probabilities summed in double on both sides; the slack is for the delta of two
    # cumulative sums as the text format prints them, not for arithmetic.
    assert delta("pc_top_class_probability_ratio_sum") == pytest.approx(sum(a.labels[0].probability for a in everything), rel=1e-5)
    assert delta("pc_prediction_records_written_total") == 4
    assert value(after, "pc_prediction_records_pending_documents") == 0
    assert value(after, "pc_prediction_record_failures_total") == 0
    live = store.live_accuracy(MODEL_NAME, window=200)
    assert value(after, "pc_live_accuracy_ratio") == pytest.approx(live.accuracy)
    assert value(after, "pc_live_accuracy_window_documents") == live.corrections

    # The export: the corrected examples in the fine-tune's format, labelled by the examiners.
    out = tmp_path / "corrected.jsonl"
    exported_run = subprocess.run(
        [sys.executable, "-m", "patent_classifier_client", "feedback", "export", "--database", exported.records_database, "--out", str(out),
         "--model", MODEL_NAME],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert exported_run.returncode == 0, exported_run.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for patent, answer, label_rank in zip(patents, answers, (0, 2, 1)):
        assert {**patent.model_dump(), "label": answer.labels[label_rank].code} in lines
    assert {"text": texts[3], "label": as_text.labels[0].code} in lines
    assert len(read_labelled_patents(out)) == len(lines)


def bad(field: str, words: str):
    return pytest.param(field, words, id=field)


def test_bad_corrections_get_an_error_naming_the_field_and_the_server_serves_on(server, store):
    patents = synthetic_patents(3, seed=72, long_share=0.0)
    with PatentClassifier(server.grpc_url, model=MODEL_NAME) as client:
        first, second, third = client.classify_batch(patents)
        client.submit_feedback(first.prediction_id, first.labels[0].code)

        def refused(corrections) -> InvalidInput:
            with pytest.raises(InvalidInput) as error:
                client.submit_feedback_batch(corrections)
            return error.value

        never_minted = new_prediction_id(now_ms=int(time.time() * 1000) - 3_600_000)  # an hour old: not on its way
        cases = [
            ([Correction(first.prediction_id, first.labels[1].code)], "PREDICTION_ID[0]", "already has a correction"),
            ([Correction(second.prediction_id, "KSCST-999")], "CORRECT_LABEL[0]",
             "'KSCST-999' is not a class of model kscst-gemma2 (188 classes: KSCST-001, KSCST-002, KSCST-003, …, KSCST-188)"),
            ([Correction(never_minted, "KSCST-001")], "PREDICTION_ID[0]", f"no recorded prediction has the id {never_minted}"),
            ([Correction("not-an-id", "KSCST-001")], "PREDICTION_ID[0]", "'not-an-id' is not a prediction id"),
            ([Correction(second.prediction_id, "KSCST-001"), Correction(second.prediction_id, "KSCST-002")],
             "PREDICTION_ID[1]", "repeats PREDICTION_ID[0]; one correction per prediction"),
            ([Correction(second.prediction_id, "KSCST-001", examiner_id="e" * 129)], "EXAMINER_ID[0]", "is 129 characters; the limit is 128"),
            ([Correction(second.prediction_id, " ")], "CORRECT_LABEL[0]", "is empty"),
            # The whole request is refused: the good correction in it is not recorded either.
            ([Correction(second.prediction_id, second.labels[0].code), Correction(third.prediction_id, "nope")],
             "CORRECT_LABEL[1]", "'nope' is not a class"),
        ]
        started = time.monotonic()
        for corrections, field, words in cases:
            error = refused(corrections)
            assert (error.field, words in error.problem) == (field, True), error
        assert time.monotonic() - started < 5  # unknown old ids fail at once, without the wait for pending records
        assert not rows(store, feedback, [second.prediction_id, third.prediction_id])
        # Tensors a client library would never send, from plain tritonclient.
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        only_ids = grpcclient.InferInput(feedback_protocol.PREDICTION_ID, [1], "BYTES")
        only_ids.set_data_from_numpy(np.array([second.prediction_id.encode()], dtype=np.object_))
        with pytest.raises(Exception, match="CORRECT_LABEL: is missing; send one element per correction"):
            raw.infer(feedback_protocol.FEEDBACK_MODEL, [only_ids])
        raw.close()
        # ... and the server serves on: both models answer, and the refused corrections can be made.
        assert client.classify(patents[0]).labels[0].code == first.labels[0].code
        assert client.submit_feedback_batch([Correction(second.prediction_id, second.labels[0].code),
                                             Correction(third.prediction_id, third.labels[0].code)]) == ["correct", "correct"]


def test_a_model_that_records_nothing_still_gives_ids_which_corrections_do_not_know(server):
    async def scenario():
        async with AsyncPatentClassifier(server.grpc_url, model=TIGHT_MODEL_NAME) as client:
            answer = await client.classify(synthetic_patents(1, seed=73)[0])
            with pytest.raises(InvalidInput) as error:
                await client.submit_feedback(answer.prediction_id, answer.labels[0].code)
            return answer, error.value

    import asyncio

    answer, error = asyncio.run(scenario())
    assert answer.prediction_id
    assert error.field == "PREDICTION_ID[0]" and "prediction_records on" in error.problem


def test_a_server_that_records_nothing_says_it_takes_no_corrections(secure_server):
    secure = secure_server
    with PatentClassifier(secure.server.grpc_url, model=MODEL_NAME, tls_ca=secure.certificates.ca, token=secure.token) as client:
        answer = client.classify(synthetic_patents(1, seed=74)[0])
        assert feedback_protocol.FEEDBACK_MODEL not in client.ready_models()
        with pytest.raises(ModelNotFound, match="takes no corrections: it serves no 'feedback' model"):
            client.submit_feedback(answer.prediction_id, answer.labels[0].code)
