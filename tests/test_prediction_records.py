"""Prediction records on their way to the database (server/prediction_records.py), without Triton:
ids at once, records written behind the answers, kept in the journal while the database is down
(a real PostgreSQL, stopped on purpose) and across a SIGKILL, replayed into that database at the
next start, never into another."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.engine import DocumentScores
from core.labels import Label, LabelSet
from patent_classifier_client.patent_document import PatentDocument
from patent_classifier_client.prediction_id import minted_at
from core.prediction_store import PredictionStore, predictions
from server.prediction_records import PredictionJournal, PredictionRecorder
from tests import waiting
from tests.conftest import PROJECT_ROOT
from benchmarks.postgres_server import PostgresServer

LABELS = LabelSet(tuple(Label(f"C{i}", f"class {i}") for i in range(4)))
PATENTS = [PatentDocument(ipc=["G06F"], title=f"장치 {i}", abstract="요약", claims=["1. 장치."]) for i in range(3)]
SCORES = [DocumentScores(np.array([0.1, 0.6, 0.2, 0.1], dtype=np.float32), 40 + i, i == 2) for i in range(3)]
WRITE_TIMEOUT_S = 30


def sqlite_store(tmp_path: Path) -> PredictionStore:
    store = PredictionStore(f"sqlite:///{tmp_path / 'records.db'}")
    store.upgrade_schema()
    store.register_model("m", "1", LABELS)
    return store


class Outage:
    """A PostgreSQL of this module's own, with a records database, that a test takes down and brings back."""

    def __init__(self, server: PostgresServer):
        self.server = server
        self.url = server.create_database("records")
        store = PredictionStore(self.url)
        store.upgrade_schema()
        store.register_model("m", "1", LABELS)
        store.close()

    def down(self) -> None:
        self.server.stop()

    def up(self) -> PredictionStore:
        self.server.start()
        return PredictionStore(self.url)


@pytest.fixture(scope="module")
def outage():
    with PostgresServer() as server:
        yield Outage(server)


def recorder(store, folder: Path, instance: str = "m_0", keep_text: bool = False) -> PredictionRecorder:
    running = PredictionRecorder(store, "m", "1", LABELS, folder, instance, keep_text=keep_text, flush_interval_s=0.05)
    running.start()
    return running


wait_until = functools.partial(waiting.wait_until, what="the records written", timeout_s=WRITE_TIMEOUT_S)


@pytest.mark.parametrize("keep_text", [False, True], ids=["hash", "text"])
def test_each_answer_gets_ids_at_once_and_its_records_reach_the_database(tmp_path, keep_text):
    store = sqlite_store(tmp_path)
    running = recorder(store, tmp_path / "journal", keep_text=keep_text)
    texts = [patent.render() for patent in PATENTS]
    before = time.time()
    ids = running.record(texts, PATENTS, SCORES, top_k=2)

    assert len(set(ids)) == 3 and all(before - 0.01 <= minted_at(i) <= time.time() + 0.01 for i in ids)
    wait_until(lambda: running.stats().written == 3)
    with store.engine.connect() as connection:
        rows = {row.id: row for row in connection.execute(predictions.select())}
    for prediction_id, text, patent, scored in zip(ids, texts, PATENTS, SCORES):
        row = rows[prediction_id]
        assert row.text_sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
        assert (row.model, row.model_version, row.top_label, row.top_labels) == ("m", "1", "C1", ["C1", "C2"])
        assert row.top_probabilities == [pytest.approx(0.6), pytest.approx(0.2)]
        assert (row.token_count, row.truncated) == (scored.token_count, scored.truncated)
        # The default keeps no text: unpublished applications are confidential.
        assert (row.text, row.document) == ((text, patent.model_dump()) if keep_text else (None, None))
    assert running.stats().pending == 0
    running.stop()
    assert running.journal_path.stat().st_size == 0  # emptied once the database had everything


KILLED_RECORDER = """
import os, signal, sys, json
from pathlib import Path
from core.prediction_store import PredictionStore
from tests.test_prediction_records import PATENTS, SCORES, recorder, wait_until
running = recorder(PredictionStore(sys.argv[1]), Path(sys.argv[2]))
ids = [i for _ in range(4) for i in running.record([p.render() for p in PATENTS], PATENTS, SCORES, top_k=2)]
wait_until(lambda: running.stats().failures["database"] >= 2)
print(json.dumps({"ids": ids, "pending": running.stats().pending}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.tools
def test_records_wait_in_the_journal_while_the_database_is_down_and_survive_a_sigkill(outage, tmp_path):
    """Deterministic: the database is down for the whole life of the first process, so no record
    can leave its journal before the kill; the next start replays all of them."""
    outage.down()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RECORDER, outage.url, str(tmp_path / "journal")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    sent = json.loads(killed.stdout)
    assert len(sent["ids"]) == 12 and sent["pending"] == 12

    store = outage.up()
    restarted = recorder(store, tmp_path / "journal")
    assert restarted.stats().pending == 12
    wait_until(lambda: restarted.stats().written == 12)
    assert store.stored_prediction_ids(sent["ids"]) == set(sent["ids"])
    restarted.stop()


@pytest.mark.tools
def test_an_unfinished_last_line_is_dropped_and_the_lines_before_it_replayed(outage, tmp_path):
    outage.down()
    first = recorder(PredictionStore(outage.url), tmp_path / "journal")
    ids = first.record([p.render() for p in PATENTS[:2]], PATENTS[:2], SCORES[:2], top_k=2)
    first.stop()
    with open(first.journal_path, "ab") as handle:
        handle.write(b'{"id": "0190a6f0-')  # a write cut short by a power cut

    store = outage.up()
    restarted = recorder(store, tmp_path / "journal")
    wait_until(lambda: restarted.stats().written == 2)
    assert store.stored_prediction_ids(ids) == set(ids)
    assert restarted.stats().failures == {"journal": 0, "database": 0, "quarantined": 0}
    restarted.stop()


@pytest.mark.tools
def test_a_journal_no_running_instance_holds_is_replayed_into_its_own_database_and_removed(outage, tmp_path):
    folder = tmp_path / "journal"
    outage.down()
    held = recorder(PredictionStore(outage.url), folder, "m_2")  # a running instance: its journal is its own
    left_behind = recorder(PredictionStore(outage.url), folder, "m_1")  # one a smaller instance_group no longer starts
    orphan_ids = left_behind.record([PATENTS[0].render()], None, SCORES[:1], top_k=1)
    left_behind.stop()  # its lock is released; its records are still in its journal

    other_database = sqlite_store(tmp_path)
    elsewhere = recorder(other_database, folder, "m_0")  # the same model recording into another database
    own = elsewhere.record([PATENTS[2].render()], None, SCORES[2:], top_k=1)
    wait_until(lambda: other_database.stored_prediction_ids(own))  # its writer has looked for orphans by then
    assert left_behind.journal_path.exists()  # never replayed into a database it was not written for
    elsewhere.stop()

    store = outage.up()
    adopter = recorder(store, folder, "m_0")
    wait_until(lambda: not left_behind.journal_path.exists())
    assert store.stored_prediction_ids(orphan_ids) == set(orphan_ids)
    assert held.journal_path.exists()
    with open(held.journal_path, "rb") as handle:  # still its owner's
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    adopter.stop()
    held.stop()


def test_a_line_of_an_orphaned_journal_that_does_not_parse_is_set_aside_and_holds_nothing_up(tmp_path):
    """The orphan's good records reach the database, and so do the adopter's own after them; the
    line is in the quarantine file, with its reason."""
    store, folder = sqlite_store(tmp_path), tmp_path / "journal"
    left_behind = PredictionRecorder(store, "m", "1", LABELS, folder, "m_1", keep_text=False)
    left_behind.journal = PredictionJournal(left_behind.journal_path)  # journaled, its writer never started
    orphan_ids = left_behind.record([PATENTS[0].render()], None, SCORES[:1], top_k=1)
    left_behind.journal.close()
    with open(left_behind.journal_path, "ab") as journal:
        journal.write(b'{"prediction_id": "not a record"}\n')

    adopter = recorder(store, folder, "m_0")
    own = adopter.record([PATENTS[1].render()], None, SCORES[1:2], top_k=1)
    wait_until(lambda: store.stored_prediction_ids(own) == set(own))
    assert store.stored_prediction_ids(orphan_ids) == set(orphan_ids)
    assert not left_behind.journal_path.exists()
    assert adopter.stats().failures == {"journal": 0, "database": 0, "quarantined": 1}
    set_aside = [json.loads(line) for line in adopter.quarantine_path.read_text(encoding="utf-8").splitlines()]
    assert [(entry["line"], entry["journal"]) for entry in set_aside] == [('{"prediction_id": "not a record"}', left_behind.journal_path.name)]
    assert "no prediction record" in set_aside[0]["error"]
    adopter.stop()


def test_a_second_server_on_the_same_journal_folder_takes_a_journal_of_its_own(tmp_path):
    store = sqlite_store(tmp_path)
    first, second = recorder(store, tmp_path / "journal"), recorder(store, tmp_path / "journal")  # same model and instance
    # Named by the replica and a number, never a PID: PIDs repeat across pods sharing a volume.
    assert second.writer == first.writer + "~2" and first.writer == f"m@{first.replica}@m_0"
    ids = first.record([PATENTS[0].render()], None, SCORES[:1], top_k=1) + second.record([PATENTS[1].render()], None, SCORES[1:2], top_k=1)
    wait_until(lambda: store.stored_prediction_ids(ids) == set(ids))
    first.stop()
    second.stop()


FULL_DISK_RECORDER = """
import json, resource, signal, sys
from pathlib import Path
from core.prediction_store import PredictionStore
from tests.test_prediction_records import PATENTS, SCORES, recorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of killing the process
running = recorder(PredictionStore(sys.argv[1]), Path(sys.argv[2]))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the kernel refuses the journal's growth, as a full disk would
ids = [i for patent, scored in zip(PATENTS * 10, SCORES * 10) for i in running.record([patent.render()], None, [scored], top_k=2)]
stats = running.stats()
running.stop()
print(json.dumps({"ids": ids, "lost": stats.failures["journal"], "journaled": stats.pending}))
"""


@pytest.mark.tools
def test_records_the_disk_refuses_are_counted_the_answers_keep_their_ids_and_the_journal_stays_whole(outage, tmp_path):
    outage.down()  # nothing leaves the journal, so it grows until the kernel refuses
    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RECORDER, outage.url, str(tmp_path / "journal")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert full.returncode == 0, full.stderr
    outcome = json.loads(full.stdout)
    assert len(set(outcome["ids"])) == 30  # every answer got its ids
    assert outcome["lost"] > 0 and outcome["journaled"] > 0 and outcome["lost"] + outcome["journaled"] == 30
    assert "could not be journaled and are lost" in full.stderr

    store = outage.up()
    restarted = recorder(store, tmp_path / "journal")
    wait_until(lambda: restarted.stats().written == outcome["journaled"])
    assert restarted.stats().failures == {"journal": 0, "database": 0, "quarantined": 0}  # no half-written line was left behind
    assert len(store.stored_prediction_ids(outcome["ids"])) == outcome["journaled"]
    restarted.stop()
