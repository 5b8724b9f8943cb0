"""`python -m patent_classifier_client classify` (the `patent-classify` command) against the real tritonserver, the
way an office runs a backlog through it: errors that name the input line, one clear message when
the server cannot be reached, and a run killed halfway that --resume finishes with every id once."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.synthetic_patents import synthetic_patents
from server.launcher import free_loopback_ports
from tests.conftest import EXAMPLE_PATENTS, KOELECTRA_MODEL, MODEL_NAME, PROJECT_ROOT, example_records
from tests.waiting import wait_until

pytestmark = pytest.mark.server  # the CLI against the real tritonserver

OUTPUT_TIMEOUT_S = 120


def classify_command(*arguments) -> list[str]:
    return [sys.executable, "-m", "patent_classifier_client", "classify", *map(str, arguments)]


def run_classify(*arguments, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(classify_command(*arguments), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def output_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_patent_gets_its_top5_and_a_bad_line_an_error_naming_its_line_and_field(server, tmp_path):
    records = example_records()
    with_bad = tmp_path / "with_bad.jsonl"
    with_bad.write_text(
        EXAMPLE_PATENTS.read_text(encoding="utf-8")
        + json.dumps({"id": "codes only", "ipc": "G06F 16/35"}) + "\n"
        + json.dumps({"id": "empty columns", "ipc": "", "title": "\u0000 ", "abstract": "", "claims": []}) + "\n"
        + "{not json\n"
        + json.dumps({"id": "new application", "title": "특허 문서 분류 장치", "claims": ["1. 장치"]}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    result = run_classify("--input", with_bad, "--url", server.grpc_url, "--batch-size", 3)

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    n = len(records)
    assert [line["id"] for line in lines] == [record["id"] for record in records] + ["codes only", "empty columns", n + 3, "new application"]
    assert all(len(line["labels"]) == 5 for line in lines[:n] + lines[-1:])
    errors = [line["error"] for line in lines[n : n + 3]]
    assert {error["kind"] for error in errors} == {"invalid_input"}
    assert errors[0]["message"].startswith(f"with_bad.jsonl line {n + 1}: holds none of title, abstract, claims")
    assert errors[1]["message"].startswith(f"with_bad.jsonl line {n + 2}: holds none of title, abstract, claims: the document has no text")
    assert errors[2]["message"].startswith(f"with_bad.jsonl line {n + 3}: is not valid JSON")
    assert result.returncode == 1 and f"3 of {n + 4} documents failed" in result.stderr


def test_a_wrong_port_stops_at_once_with_one_message_naming_the_likely_cause(server, tmp_path):
    """gRPC pointed at the HTTP port: before, one "Socket closed" line per document, and exit 0 or 1."""
    result = run_classify("--input", EXAMPLE_PATENTS, "--output", tmp_path / "answers.jsonl", "--url", server.http_url)

    assert result.returncode == 3
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1, result.stderr
    assert f"{server.http_url} answers, but not over grpc: it looks like the server's http port; use protocol http" in message[0]
    assert not (tmp_path / "answers.jsonl").exists()  # nothing was answered, nothing written

    (nobody,) = free_loopback_ports(1)
    down = run_classify("--input", EXAMPLE_PATENTS, "--url", f"127.0.0.1:{nobody}", "--protocol", "http")
    assert down.returncode == 3 and down.stdout == ""
    assert f"nothing listens at 127.0.0.1:{nobody}: is the server running" in down.stderr


def test_repeated_ids_are_refused_naming_both_lines(server, tmp_path):
    records = example_records()[:3]
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({**record, "id": "P-1"}, ensure_ascii=False) + "\n" for record in records[:2]))

    result = run_classify("--input", repeated, "--output", tmp_path / "out.jsonl", "--url", server.grpc_url)

    assert result.returncode == 2
    assert 'repeated.jsonl line 2.id: "P-1" is the id of line 1 too; ids must be unique' in result.stderr


def wait_for_lines(path: Path, count: int, process: subprocess.Popen) -> int:
    """Whole lines in ``path`` once there are at least ``count``."""
    deadline = time.monotonic() + OUTPUT_TIMEOUT_S
    while time.monotonic() < deadline:
        whole = path.read_bytes().count(b"\n") if path.exists() else 0
        if whole >= count:
            return whole
        assert process.poll() is None, f"the run ended early with {process.returncode}"
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {count} lines in {path} after {OUTPUT_TIMEOUT_S} s")


def test_a_run_killed_halfway_through_1000_patents_resumes_to_exactly_1000_answers(server, tmp_path):
    patents = synthetic_patents(1000, seed=1000, long_share=0.1)
    backlog = tmp_path / "backlog.jsonl"
    backlog.write_text(
        "".join(json.dumps({"id": f"P{index:04d}", **patent.to_json()}, ensure_ascii=False) + "\n" for index, patent in enumerate(patents)),
        encoding="utf-8",
    )
    first_half = backlog.read_text(encoding="utf-8").splitlines(keepends=True)[:500]
    answers = tmp_path / "answers.jsonl"
    options = ("--output", answers, "--url", server.grpc_url, "--model", KOELECTRA_MODEL, "--quiet")

    # The first run reads the backlog's first 500 lines through a pipe that stays open, so it can
    # never get past them: killed once 400 answers are written, it is killed halfway, whatever the
    # machine's speed. (At most 2 × concurrency batches and one partial batch wait unwritten: 432 are.)
    run = subprocess.Popen(classify_command("--input", "-", *options), cwd=PROJECT_ROOT, stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run.stdin.write("".join(first_half).encode())
    run.stdin.flush()
    try:
        wait_for_lines(answers, 400, run)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        run.stdin.close()
    before = output_lines(answers)
    assert 400 <= len(before) <= 500 and all("labels" in line for line in before)
    assert len({line["id"] for line in before}) == len(before)
    # What a kill in the middle of a write leaves: the start of one more line.
    next_id = f"P{len(before):04d}"
    assert next_id not in {line["id"] for line in before}
    with open(answers, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": next_id, "labels": [{"code": "positive"}]})[:25])

    resumed = run_classify("--input", backlog, *options, "--resume", "--batch-size", 16)

    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} documents answered already; 1 line of the earlier run to redo" in resumed.stderr
    after = output_lines(answers)
    assert len(after) == 1000
    assert sorted(line["id"] for line in after) == [f"P{index:04d}" for index in range(1000)]
    assert after[: len(before)] == before  # the first run's answers kept as they were
    assert all(len(line["labels"]) == 3 for line in after)  # sentiment-koelectra: 3 classes, all of them


def connections_to(port: int) -> int:
    """This process's established TCP connections to ``port`` (/proc/net/tcp and tcp6, by the
    socket inodes among this process's open files)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC's sockets are IPv6 ones, to IPv4-mapped addresses
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port, state, inode = int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]
            count += remote_port == port and state == "01" and inode in inodes
    return count


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_batch_run_leaves_no_connection_open_in_the_calling_process(server, protocol):
    """Each worker thread of a run opens its own client. A service that runs many batch jobs must
    not keep their connections, and a server being stopped waits out its exit timeout for open
    HTTP connections. Both when the run ends and when its caller stops reading early."""
    from patent_classifier_client.batch_classification import ServerAddress, classify_in_batches
    from patent_classifier_client.protocol import Classification

    url = server.grpc_url if protocol == "grpc" else server.http_url
    port = int(url.rsplit(":", 1)[1])
    documents = synthetic_patents(12, seed=83, long_share=0.0)
    # Two replica addresses (the same server twice): a replica set's clients are not freed when
    # the run's threads end, so only closing them ends their connections.
    address = ServerAddress(f"{url},{url}", protocol, MODEL_NAME, timeout_s=60)

    answers = [answer for batch in classify_in_batches(enumerate(documents), address, batch_size=2, concurrency=4)
               for _, answer in batch]
    assert len(answers) == len(documents) and all(isinstance(answer, Classification) for answer in answers)
    wait_until(lambda: connections_to(port) == 0, f"the run's {protocol} connections closed", timeout_s=10)

    run = classify_in_batches(enumerate(documents), address, batch_size=2, concurrency=4)
    assert isinstance(next(run)[0][1], Classification)
    assert connections_to(port) > 0  # what the check sees while a run is open
    run.close()
    wait_until(lambda: connections_to(port) == 0, f"the stopped run's {protocol} connections closed", timeout_s=10)
