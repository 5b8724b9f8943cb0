"""The records database taken away from a real server while it classifies at load, and the other
records faults, through the real tritonserver and a real PostgreSQL (Debian's, on loopback):

1. PostgreSQL is stopped before the models load, and classification runs at load while it comes
   back (at a quarter of the documents), goes away again (at half) and comes back (at three
   quarters): no classification may fail, and every answered id must reach the database.
2. While it is away, a correction is answered UNAVAILABLE (retry), never a permanent error.
3. A forged prediction id (ffffffff-ffff-7fff-bfff-ffffffffffff) is answered within
   pending_wait_s + 1 s.
4. A record the database refuses (a trigger refuses one document's hash, as a constraint would)
   is set aside in the quarantine file while the next ``--after-poison`` records arrive.

The records settings reach the server through its environment, as in a pod: the database URL, the
journal folder and the replica name (config.pbtxt names a SQLite file the override replaces).

    .venv/bin/python -m benchmarks.records_outage [--model-dir model_repository/kscst-gemma2/1/model] \\
        [--documents 2000] [--after-poison 1000] [--concurrency 8]

It prints one JSON line per step and a summary, and exits 1 when a check fails. Bounded: by its
document counts, and every wait by ``--timeout-s``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.exc import ProgrammingError

from benchmarks.postgres_server import PostgresServer
from patent_classifier_client import PatentClassifier
from patent_classifier_client.command_line import HelpFormatter
from patent_classifier_client.errors import InvalidInput, ServingError
from core.prediction_store import PredictionStore
from core.serving_config import FeedbackConfig, ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import write_feedback_model, write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports

MODEL = "kscst-gemma2"
FORGED_ID = "ffffffff-ffff-7fff-bfff-ffffffffffff"
REPLICA = "records-outage-0"
MAX_LENGTH = 512


@dataclass
class Load:
    """Answers and failures of one run of classification at load."""

    ids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        return len(self.ids) + len(self.failures)


def short_patents(count: int, seed: int) -> list[str]:
    """IPC codes and a title: many per forward pass, so the load is the records', not the model's."""
    return [f"IPC: {', '.join(p.ipc)}\n발명의 명칭: {p.title} {index}"
            for index, p in enumerate(synthetic_patents(count, seed=seed, long_share=0.0))]


def classify_at_load(url: str, texts: list[str], concurrency: int, load: Load) -> None:
    """Each text in a request of its own, ``concurrency`` in flight."""
    with PatentClassifier(url, model=MODEL, timeout_s=60) as client:  # thread-safe over gRPC

        def one(text: str) -> None:
            try:
                answer = client.classify(text)
            except Exception as error:  # counted, never raised: the run reports every failure
                with load.lock:
                    load.failures.append(f"{type(error).__name__}: {error}")
                return
            with load.lock:
                load.ids.append(answer.prediction_id)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, texts))


def wait_for(condition, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            return None
        time.sleep(interval_s)
    return result


def stored(store: PredictionStore, ids: list[str]) -> set[str]:
    """The ids in the database; none while the writers have not created its schema yet."""
    try:
        return {i for first in range(0, len(ids), 500) for i in store.stored_prediction_ids(ids[first:first + 500])}
    except ProgrammingError:
        return set()


def metrics(url: str) -> dict[str, float]:
    """The records' samples of the classifier, summed over their labels but ``stage``."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("pc_prediction_record", "pc_prediction_journal")):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{")[0]
            stage = name_labels.partition('stage="')[2].partition('"')[0]
            key = f"{name}{{stage={stage}}}" if stage else name
            found[key] = found.get(key, 0.0) + float(value)
    return found


def run(model_dir: Path, workdir: Path, documents: int, after_poison: int, concurrency: int, pending_wait_s: float,
        timeout_s: float, report=print) -> dict:
    checks: dict[str, bool] = {}
    with PostgresServer() as database:
        url = database.create_database("records")
        database.stop()  # away when the models load
        repository = workdir / "model_repository"
        write_triton_model(repository, MODEL, ServingConfig(
            model_dir=model_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu",
            prediction_records="hash", records_database="sqlite:///records-not-used.db",
        ))
        write_feedback_model(repository, FeedbackConfig(records_database="sqlite:///records-not-used.db", pending_wait_s=pending_wait_s))
        journal = workdir / "journal"
        os.environ.update({"PATENT_CLASSIFIER_RECORDS_DATABASE": url, "PATENT_CLASSIFIER_RECORDS_JOURNAL": str(journal),
                           "PATENT_CLASSIFIER_REPLICA": REPLICA})  # the server's environment, as a pod's
        http_port, grpc_port, metrics_port = free_loopback_ports(3)
        started = time.monotonic()
        server = TritonServer(LaunchConfig(
            model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            backend_directory=workdir / "backends", ready_timeout_s=timeout_s, exit_timeout_s=5,
        ), log_path=workdir / "tritonserver.log").start()
        report(json.dumps({"step": "loaded with the database away", "seconds": round(time.monotonic() - started, 1)}))
        store = PredictionStore(url)
        try:
            # 1. and 2.: classification at load through two outages.
            load, texts = Load(), short_patents(documents, seed=2026)
            worker = threading.Thread(target=classify_at_load, args=(server.grpc_url, texts, concurrency, load))
            outage_answers: dict[str, str] = {}
            started = time.monotonic()
            worker.start()
            with PatentClassifier(server.grpc_url, model=MODEL, timeout_s=60) as client:
                for fraction, up in ((0.25, True), (0.5, False), (0.75, True)):
                    wait_for(lambda: load.done >= documents * fraction or not worker.is_alive(), timeout_s)
                    if up:
                        database.start()
                        back_at = time.monotonic()
                        continue
                    database.stop()
                    answer = client.classify(texts[0] + " (장애 중)")
                    try:
                        client.submit_feedback(answer.prediction_id, answer.labels[0].code)
                        outage_answers["during the outage"] = "acknowledged"
                    except ServingError as error:
                        outage_answers["during the outage"] = type(error).__name__
            worker.join()
            load_seconds = time.monotonic() - started
            lost = set(load.ids) - (wait_for(lambda: (s := stored(store, load.ids)) == set(load.ids) and s, timeout_s) or stored(store, load.ids))
            arrived_s = time.monotonic() - back_at
            checks["no classification failed"] = not load.failures
            checks["every answered record stored"] = not lost and len(load.ids) == documents
            checks["a correction while the database is away is UNAVAILABLE"] = outage_answers.get("during the outage") == "ServerUnavailable"
            report(json.dumps({"step": "classification through two outages", "documents": documents, "answered": len(load.ids),
                               "failed": len(load.failures), "samples_per_s": round(documents / load_seconds, 1),
                               "records_lost": len(lost), "all_stored_s_after_back": round(arrived_s, 1),
                               "correction_while_away": outage_answers.get("during the outage"),
                               "first_failures": load.failures[:3]}, ensure_ascii=False))

            # 3. A forged id.
            with PatentClassifier(server.grpc_url, model=MODEL, timeout_s=60) as client:
                started = time.monotonic()
                try:
                    client.submit_feedback(FORGED_ID, "KSCST-001")
                    forged = "acknowledged"
                except ServingError as error:
                    forged = f"{type(error).__name__}: {error}"
                forged_s = time.monotonic() - started
            checks["a forged id answered within pending_wait_s + 1 s, INVALID_ARGUMENT"] = (
                forged_s <= pending_wait_s + 1 and forged.startswith(InvalidInput.__name__))
            report(json.dumps({"step": "forged id", "answer": forged, "seconds": round(forged_s, 3), "pending_wait_s": pending_wait_s}))

            # 4. A record the database refuses, then the next ones.
            poison = texts[1] + " (독성 기록)"
            with psycopg.connect(url) as connection:
                connection.execute(
                    "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN IF NEW.text_sha256 = '"
                    + hashlib.sha256(poison.encode("utf-8")).hexdigest()
                    + "' THEN RAISE EXCEPTION 'this record is refused' USING ERRCODE = 'check_violation'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql")
                connection.execute("CREATE TRIGGER refuse_poison BEFORE INSERT ON predictions FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
            before = metrics(server.metrics_url)
            with PatentClassifier(server.grpc_url, model=MODEL, timeout_s=60) as client:
                poisoned_id = client.classify(poison).prediction_id
            after, next_texts = Load(), short_patents(after_poison, seed=2027)
            started = time.monotonic()
            classify_at_load(server.grpc_url, next_texts, concurrency, after)
            arrived = wait_for(lambda: (s := stored(store, after.ids)) == set(after.ids) and s, timeout_s) or stored(store, after.ids)
            next_s = time.monotonic() - started
            set_aside = [json.loads(line) for path in journal.glob("*.quarantine.jsonl") for line in path.read_text(encoding="utf-8").splitlines()]
            quarantined_ids = [json.loads(entry["line"])["id"] for entry in set_aside]
            samples = wait_for(lambda: (m := metrics(server.metrics_url)) and m.get("pc_prediction_records_pending_documents") == 0 and m, timeout_s) \
                or metrics(server.metrics_url)
            quarantined = samples.get("pc_prediction_record_failures_total{stage=quarantined}", 0) - \
                before.get("pc_prediction_record_failures_total{stage=quarantined}", 0)
            checks["the refused record set aside, with its error"] = quarantined_ids == [poisoned_id] and quarantined == 1 \
                and not stored(store, [poisoned_id])
            checks[f"the next {after_poison} records all stored"] = arrived == set(after.ids) and len(after.ids) == after_poison
            report(json.dumps({"step": "a refused record, then the next ones", "refused_id": poisoned_id,
                               "set_aside": [entry["error"] for entry in set_aside], "next": after_poison,
                               "next_answered": len(after.ids), "next_failed": len(after.failures),
                               "next_stored": len(arrived), "seconds": round(next_s, 1)}, ensure_ascii=False))
            checks["config.pbtxt's SQLite file was never used"] = not (workdir / "records-not-used.db").exists()
            checks["nothing pending at the end"] = samples.get("pc_prediction_records_pending_documents") == 0
            report(json.dumps({"step": "metrics at the end", **samples}))
        finally:
            store.close()
            server.stop()
            for name in ("PATENT_CLASSIFIER_RECORDS_DATABASE", "PATENT_CLASSIFIER_RECORDS_JOURNAL", "PATENT_CLASSIFIER_REPLICA"):
                os.environ.pop(name, None)
    summary = {"checks": checks, "passed": all(checks.values())}
    report(json.dumps(summary, ensure_ascii=False))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.records_outage", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("model_repository") / MODEL / "1" / "model",
                        help="a merged classifier folder (make export writes the demo's)")
    parser.add_argument("--documents", type=int, default=2000, help="documents classified through the outages")
    parser.add_argument("--after-poison", type=int, default=1000, help="documents classified after the refused one")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--pending-wait-s", type=float, default=2.0, help="the feedback model's pending_wait_s")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="the longest any one wait may take")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the repository, journal and logs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="records-outage-") as scratch:
        workdir = args.work_dir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = run(args.model_dir, workdir, args.documents, args.after_poison, args.concurrency, args.pending_wait_s, args.timeout_s)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
