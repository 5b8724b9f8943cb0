"""The records database's faults through the real tritonserver and a real PostgreSQL: a bounded run
of benchmarks/records_outage.py (the database away at load and twice during classification, a
correction while it is away, a forged id, a refused record and the records after it), and the
exported config.pbtxt files holding no path of the export's machine."""
from __future__ import annotations

import pytest

from benchmarks.records_outage import run

pytestmark = [pytest.mark.server, pytest.mark.tools]  # tritonserver over a PostgreSQL stopped and started


def test_classification_survives_the_records_database_going_away_and_no_record_is_lost(exported, tmp_path):
    lines = []
    summary = run(exported.merged_dir, tmp_path, documents=120, after_poison=200, concurrency=4, pending_wait_s=1.0,
                  timeout_s=240, report=lines.append)
    print("\n" + "\n".join(lines))
    assert summary["checks"] and all(summary["checks"].values()), summary["checks"]


def test_the_exported_configuration_holds_no_path_of_the_export_machine(exported):
    base = exported.repository.resolve().parent
    records_lines = [line for config in exported.repository.glob("*/config.pbtxt") for line in config.read_text().splitlines()
                     if 'key: "records_' in line]
    assert records_lines and not [line for line in records_lines if str(base) in line], records_lines
