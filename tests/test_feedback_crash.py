"""Crashes and outages, through the real server on a real PostgreSQL (Debian's, on loopback), behind
the access token: SIGKILL while corrections are being written loses no acknowledged correction;
prediction records wait in the journal through a database outage and a SIGKILL, and the next
start writes them. Each scenario holds the database on purpose, so what is in flight at the kill
does not depend on the machine's speed."""
from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest
from pydantic import SecretStr

from patent_classifier_client import PatentClassifier
from patent_classifier_client.errors import AccessDenied, ServingError
from core.prediction_store import PredictionStore, feedback
from core.serving_config import FeedbackConfig, ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import write_feedback_model, write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports
from server.model_watchdog import stub_processes
from tests.conftest import ACCESS_TOKEN, MAX_LENGTH, MODEL_NAME
from benchmarks.postgres_server import PostgresServer
from tests.test_monitoring import scrape, value
from tests.waiting import wait_until

pytestmark = [pytest.mark.server, pytest.mark.tools]  # tritonservers killed over a real PostgreSQL

CORRECTING_THREADS = 4
WAIT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def database():
    """A PostgreSQL of this module's own: the outage test stops and restarts it."""
    with PostgresServer() as running:
        yield running


@pytest.fixture(scope="module")
def repository(exported, database, tmp_path_factory):
    url = database.create_database("records")
    repository = tmp_path_factory.mktemp("crash_repository")
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu",
        prediction_records="hash", records_database=url,
    ))
    write_feedback_model(repository, FeedbackConfig(records_database=url))
    return repository, url


def launch(repository, folder) -> TritonServer:
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    config = LaunchConfig(
        model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        backend_directory=folder / "backends", ready_timeout_s=180, exit_timeout_s=5, token=SecretStr(ACCESS_TOKEN),
        reload_dead_models=False,  # a crash test: nothing brings the models back behind its back
    )
    return TritonServer(config, log_path=folder / f"tritonserver-{grpc_port}.log").start()


def sigkill(server: TritonServer) -> None:
    """The whole server at once: tritonserver and every model's stub process."""
    for stub in stub_processes(server.process.pid):
        os.kill(stub.pid, signal.SIGKILL)
    server.process.kill()
    server.process.wait()
    server.stop()


def connect(server: TritonServer, **options) -> PatentClassifier:
    return PatentClassifier(server.grpc_url, model=MODEL_NAME, timeout_s=30, **{"token": ACCESS_TOKEN, **options})


def test_corrections_need_the_access_token_like_classification(repository, tmp_path):
    server = launch(repository[0], tmp_path)
    try:
        with connect(server) as client:
            answer = client.classify(synthetic_patents(1, seed=80)[0])
        with connect(server, token=None) as anonymous:
            with pytest.raises(AccessDenied):
                anonymous.submit_feedback(answer.prediction_id, answer.labels[0].code)
        with connect(server) as client:
            assert client.submit_feedback(answer.prediction_id, answer.labels[0].code) == "correct"
    finally:
        server.stop()


def test_sigkill_while_corrections_are_written_loses_no_acknowledged_correction(repository, tmp_path):
    folder, url = repository
    server = launch(folder, tmp_path)
    acknowledged, failed, in_flight_since = [], [], {}
    try:
        with connect(server) as client:
            answers = client.classify_batch(synthetic_patents(64, seed=81, long_share=0.0))
        pending = list(answers)
        taking = threading.Lock()

        def correct_until_it_fails(worker: int) -> None:
            with connect(server) as client:
                while True:
                    with taking:
                        if not pending:
                            return
                        answer = pending.pop()
                    in_flight_since[worker] = time.monotonic()
                    try:
                        client.submit_feedback(answer.prediction_id, answer.labels[1].code, examiner_id=f"e-{worker}")
                    except ServingError as error:
                        failed.append((answer.prediction_id, error))
                        return
                    acknowledged.append(answer.prediction_id)

        workers = [threading.Thread(target=correct_until_it_fails, args=(n,)) for n in range(CORRECTING_THREADS)]
        for worker in workers:
            worker.start()
        wait_until(lambda: len(acknowledged) >= 8, "8 acknowledged corrections")
        # Hold every further insert into the corrections table; reads go on, so requests reach the insert and wait there.
        with psycopg.connect(url) as holder:
            holder.execute("LOCK TABLE feedback IN EXCLUSIVE MODE")
            wait_until(lambda: len(in_flight_since) == CORRECTING_THREADS
                       and all(time.monotonic() - since > 1.0 for since in in_flight_since.values()),
                       "every worker waiting on its correction")
            sigkill(server)
            holder.rollback()
        for worker in workers:
            worker.join(WAIT_TIMEOUT_S)
    finally:
        server.stop()

    store = PredictionStore(url)
    with store.engine.connect() as connection:
        ours = feedback.c.prediction_id.in_([answer.prediction_id for answer in answers])
        stored = set(connection.scalars(feedback.select().with_only_columns(feedback.c.prediction_id).where(ours)))
    store.close()
    assert len(failed) == CORRECTING_THREADS  # each worker's correction in flight at the kill failed, visibly
    assert set(acknowledged) <= stored  # the guarantee: acknowledged means committed
    assert stored == set(acknowledged)  # and what was in flight was not half-recorded
    print(f"\n{len(acknowledged)} corrections acknowledged before the kill, all stored; "
          f"{len(failed)} in flight failed with {sorted({type(error).__name__ for _, error in failed})}")


def test_records_wait_in_the_journal_through_an_outage_and_a_sigkill_and_reach_the_database(repository, database, tmp_path):
    folder, url = repository
    server = launch(folder, tmp_path)
    try:
        database.stop()
        with connect(server) as client:  # the database being down does not touch the answers
            answers = client.classify_batch(synthetic_patents(6, seed=82)) + client.classify_batch(synthetic_patents(2, seed=83))
        ids = [answer.prediction_id for answer in answers]

        def journaled():
            samples, _ = scrape(server.metrics_url)
            if value(samples, "pc_prediction_records_pending_documents") == len(ids) and \
                    value(samples, "pc_prediction_record_failures_total", stage="database") >= 1:
                return samples
            return None

        samples = wait_until(journaled, "the records pending in the journal and the failed writes counted")
        assert value(samples, "pc_prediction_records_written_total") == 0
        sigkill(server)
    finally:
        server.stop()
        database.start()

    restarted = launch(folder, tmp_path)
    try:
        store = PredictionStore(url)
        wait_until(lambda: store.stored_prediction_ids(ids) == set(ids), "the journal replayed into the database")
        store.close()
        samples = wait_until(lambda: (s := scrape(restarted.metrics_url)[0]) and
                             value(s, "pc_prediction_records_written_total") == len(ids) and s, "the replay counted")
        assert value(samples, "pc_prediction_records_pending_documents") == 0
    finally:
        restarted.stop()
