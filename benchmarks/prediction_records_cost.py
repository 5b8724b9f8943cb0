"""What prediction records cost, piece by piece, without a server: the time ``record()`` adds to
each answer on the answer thread (ids minted, records journaled) while the writer thread works
beside it, and the time the writer spends per record putting them into a SQLite database. `make bench` with
``--prediction-records`` measures the whole server; on a shared 2-core machine its run-to-run
spread is wider than these costs, which this measures directly.

    .venv/bin/python -m benchmarks.prediction_records_cost [--answers 1280] [--batch 12]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from patent_classifier_client.command_line import HelpFormatter
from core.engine import DocumentScores
from core.labels import LabelSet
from core.prediction_store import PredictionRecord, PredictionStore
from core.synthetic_patents import synthetic_patents
from export.demo_models import KSCST_LABELS_FILE
from server.prediction_records import PredictionJournal, PredictionRecorder


def measure(keep_text: bool, answers: int, batch: int) -> dict:
    labels = LabelSet.read_tsv(KSCST_LABELS_FILE)
    patents = synthetic_patents(64, seed=2026, long_share=0.7)
    rng = np.random.default_rng(0)
    scores = [DocumentScores(rng.dirichlet(np.ones(len(labels))).astype(np.float32), 512, True) for _ in patents]
    with tempfile.TemporaryDirectory() as folder:
        store = PredictionStore(f"sqlite:///{folder}/records.db")
        store.upgrade_schema()
        store.register_model("m", "1", labels)

        # record() on the answer thread, with the writer thread at work beside it, as in the server:
        # one-document answers (the office's backend sends one patent per request), in bursts of 64.
        recorder = PredictionRecorder(store, "m", "1", labels, Path(folder) / "journal", "m_0", keep_text=keep_text)
        recorder.start()
        seconds = []
        for index in range(answers):
            patent, scored = patents[index % len(patents)], scores[index % len(scores)]
            started = time.perf_counter()
            recorder.record([patent.render()], [patent], [scored], top_k=5)
            seconds.append(time.perf_counter() - started)
            if index % len(patents) == len(patents) - 1:
                time.sleep(0.25)
        while recorder.stats().pending:
            time.sleep(0.05)
        recorder.stop()
        seconds.sort()

        # The writer's work per record, alone: a journal of the same answers, its thread not started.
        offline = PredictionRecorder(store, "m", "1", labels, Path(folder) / "journal", "m_1", keep_text=keep_text)
        offline.journal = PredictionJournal(offline.journal_path)
        for index in range(answers):
            patent, scored = patents[index % len(patents)], scores[index % len(scores)]
            offline.record([patent.render()], [patent], [scored], top_k=5)
        cpu, wall = time.thread_time(), time.perf_counter()
        while offline.journal.pending:  # what the writer does, each chunk read once, in transactions of `batch` records
            lines = offline.journal.read().splitlines()
            for first in range(0, len(lines), batch):
                transaction = lines[first : first + batch]
                store.insert_predictions([PredictionRecord.from_json(json.loads(line)) for line in transaction])
                offline.journal.committed(sum(len(line) + 1 for line in transaction), len(transaction))
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        store.close()
    return {
        "mode": "text" if keep_text else "hash",
        "mean_text_characters": round(statistics.mean(len(p.render()) for p in patents)),
        "record_us_median": round(seconds[len(seconds) // 2] * 1e6),
        "record_us_p99": round(seconds[int(len(seconds) * 0.99)] * 1e6),
        "writer_cpu_us_per_record": round(cpu / answers * 1e6),
        "writer_wall_us_per_record": round(wall / answers * 1e6),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prediction_records_cost", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--answers", type=int, default=1280, help="one-document answers recorded per mode")
    parser.add_argument("--batch", type=int, default=12, help="records per database transaction (the writer's at 60 answers/s)")
    args = parser.parse_args(argv)
    for keep_text in (False, True):
        print(json.dumps(measure(keep_text, args.answers, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
