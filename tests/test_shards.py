"""`classify --shard I/N` and `shards check` without a server: which shard a line belongs to, and
what the check says of complete, incomplete, doubled and foreign outputs (the shard workers
against the real server: tests/test_fleet.py)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from patent_classifier_client.answers_file import id_key
from patent_classifier_client.shards import Shard, foreign_answers, shard_of
from tests.conftest import PROJECT_ROOT


def test_shards_partition_the_ids_the_same_way_in_every_process():
    keys = [id_key(f"P{index:05d}") for index in range(3000)] + [id_key(index) for index in range(1, 1001)]
    shards = [Shard(index, 3) for index in range(3)]
    owners = [[shard.index for shard in shards if shard.holds(key)] for key in keys]
    assert all(len(owner) == 1 for owner in owners)  # each id in exactly one shard
    sizes = [sum(owner == [index] for owner in owners) for index in range(3)]
    # A hash spreads 4,000 ids binomially: 1,333 ± 30 per shard; 5 standard deviations either way.
    assert all(abs(size - len(keys) / 3) < 5 * (len(keys) * (1 / 3) * (2 / 3)) ** 0.5 for size in sizes), sizes
    assert id_key(7) != id_key("7")
    # Python's own hash() differs between processes (PYTHONHASHSEED); the shard must not.
    other = subprocess.run(
        [sys.executable, "-c", "from patent_classifier_client.shards import shard_of; print([shard_of(k, 7) for k in ('\"P00001\"', '42', '\"특허\"')])"],
        cwd=PROJECT_ROOT / "clients", capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.stdout.strip() == str([shard_of(key, 7) for key in ('"P00001"', "42", '"특허"')])


@pytest.mark.parametrize("text", ["3/3", "1", "a/3", "-1/3", "0/0", "1/2/3"])
def test_a_shard_outside_its_count_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="I/N|from 0 to N-1"):
        Shard.parse(text)
    assert Shard.parse("2/3") == Shard(2, 3)


def test_resuming_a_file_with_another_shards_answers_is_refused():
    shard = Shard(0, 2)
    mine = next(key for key in (id_key(f"P{index}") for index in range(100)) if shard.holds(key))
    other = next(key for key in (id_key(f"P{index}") for index in range(100)) if not shard.holds(key))
    assert foreign_answers({mine}, shard, "answers-0.jsonl") is None
    assert "answers 1 ids of other shards" in foreign_answers({mine, other}, shard, "answers-0.jsonl")


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def answer(identifier) -> dict:
    return {"id": identifier, "labels": [{"code": "A", "probability": 1.0}], "token_count": 3, "truncated": False}


def run_check(tmp_path: Path, outputs: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "patent_classifier_client", "shards", "check", "--input", str(tmp_path / "backlog.jsonl"), "--outputs", *map(str, outputs)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def backlog(tmp_path) -> list:
    """Six lines: five with ids, one without (its id is its line number, 4)."""
    ids = ["P1", "P2", "P3", 4, "P5", "P6"]
    write_lines(tmp_path / "backlog.jsonl", [
        {"id": identifier, "title": "특허"} if identifier != 4 else {"title": "번호 없는 특허"} for identifier in ids
    ])
    return ids


def test_the_check_passes_when_every_line_is_answered_once_across_the_outputs(tmp_path, backlog):
    first = write_lines(tmp_path / "a.jsonl", [answer(identifier) for identifier in backlog[:4]])
    second = write_lines(tmp_path / "b.jsonl", [answer(identifier) for identifier in backlog[4:]])

    result = run_check(tmp_path, [first, second])

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == "complete: all 6 ids of backlog.jsonl answered exactly once in 2 outputs"


def test_the_check_lists_every_id_missing_failed_doubled_or_unknown(tmp_path, backlog):
    first = write_lines(tmp_path / "a.jsonl", [answer("P1"), answer("P2"), answer(4), {"id": "P3", "error": {"kind": "invalid_input"}}])
    second = write_lines(tmp_path / "b.jsonl", [answer("P2"), answer("P9"), '{"id": "P5", "lab'])  # P5's line cut short

    result = run_check(tmp_path, [first, second])

    assert result.returncode == 1
    problems = [json.loads(line) for line in result.stdout.splitlines()]
    assert problems == [
        {"id": "P2", "problem": "doubled", "where": ["a.jsonl line 2", "b.jsonl line 1"]},
        {"id": "P3", "problem": "failed", "where": ["a.jsonl line 4"]},
        {"id": "P5", "problem": "missing", "where": []},
        {"id": "P6", "problem": "missing", "where": []},
        {"id": "P9", "problem": "unknown", "where": ["b.jsonl line 2"]},
    ]
    summary = result.stderr.splitlines()
    assert 'missing: 2 input ids no output answers: "P5", "P6"' in summary
    assert "1 output lines are torn or not JSON (a run killed mid-write): --resume redoes them" in summary
    assert summary[-1] == "incomplete: 2 of 6 ids of backlog.jsonl answered exactly once in 2 outputs"


def test_an_output_that_does_not_exist_is_unreadable(tmp_path, backlog):
    result = run_check(tmp_path, [tmp_path / "never-written.jsonl"])
    assert result.returncode == 2
    assert result.stderr.startswith("cannot check: cannot read ") and "never-written.jsonl" in result.stderr


def test_an_input_that_repeats_an_id_cannot_be_checked(tmp_path):
    write_lines(tmp_path / "backlog.jsonl", [{"id": "P1", "title": "a"}, {"id": "P1", "title": "b"}])
    output = write_lines(tmp_path / "a.jsonl", [answer("P1")])
    result = run_check(tmp_path, [output])
    assert result.returncode == 2
    assert 'backlog.jsonl line 2.id: "P1" appears twice; ids must be unique' in result.stderr
