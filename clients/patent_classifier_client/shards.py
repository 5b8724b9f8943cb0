"""A backlog split over workers: ``classify --shard I/N`` answers the lines of shard I of N, and
``shards check`` verifies that N shard outputs answer every input line exactly once.

Which shard a line belongs to follows from its id alone: the id its output line carries (its
"id", or its line number when it has none), written as JSON (so 7 and "7" are two ids, as in
``--resume``), hashed with BLAKE2b to 64 bits, modulo N. So every worker reads the same input
and sends only its own lines, a re-run with the same N sends the same lines, and no list of
assignments has to be kept anywhere. (An id-less line's shard is its line number's: stable as
long as the file is not edited; give lines ids for a file that changes.)

    python -m patent_classifier_client classify --input backlog.jsonl --shard 0/3 --output answers-0.jsonl --resume
    python -m patent_classifier_client shards check --input backlog.jsonl --outputs answers-0.jsonl answers-1.jsonl answers-2.jsonl

The check prints one JSON line per id that is not answered exactly once, on standard output
({"id", "problem": "missing" | "failed" | "doubled" | "unknown", "where"}), and one line per
kind of problem on standard error. Exit codes: 0 every input line answered exactly once; 1 some
are missing, failed (only error lines), doubled, or an output answers an id the input lacks;
2 the input or an output cannot be read, or the input repeats an id.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from patent_classifier_client.answers_file import id_key, answer_line
from patent_classifier_client.patent_lines import read_patent_lines

EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2
_SHOWN = 5  # ids named in a summary line; standard output lists every one


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``I/N`` as the command line writes it (argparse puts the option's name in front of the error)."""
        index, slash, count = text.partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: give I/N, shard I (from 0) of N, e.g. 0/4")
        shard = cls(int(index), int(count))
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise argparse.ArgumentTypeError(f"{text!r}: N must be at least 1 and I from 0 to N-1")
        return shard

    def holds(self, key: str) -> bool:
        """Whether the id with this ``id_key`` is in this shard."""
        return shard_of(key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def foreign_answers(answered: set[str], shard: Shard, output: str) -> str | None:
    """Why resuming ``output`` as ``shard`` is refused: it answers ids of other shards (a run
    with another N, or another shard's file), which the check would find doubled."""
    foreign = sorted(key for key in answered if not shard.holds(key))
    if not foreign:
        return None
    return (f"--resume {output} --shard {shard}: the file answers {len(foreign)} ids of other shards (first {foreign[0]}); "
            "was it written with another --shard? Give each shard its own output file")


def shard_of(key: str, count: int) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


class InputError(Exception):
    """The input or an output cannot be read, or the input repeats an id."""


@dataclass
class ShardCheck:
    """What N outputs answer of one input."""

    input_ids: dict[str, object] = field(default_factory=dict)  # id_key -> the id as written
    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # id_key -> "file line n" of each answer
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # id_key -> where its error lines are
    answered_ids: dict[str, object] = field(default_factory=dict)
    unreadable_lines: int = 0  # torn or not JSON: what --resume drops and redoes

    def problems(self) -> list[dict]:
        found = []
        for key, identifier in self.input_ids.items():
            answers = self.answers.get(key, [])
            if len(answers) > 1:
                found.append({"id": identifier, "problem": "doubled", "where": answers})
            elif not answers:
                failed = self.errors.get(key)
                found.append({"id": identifier, "problem": "failed" if failed else "missing", "where": failed or []})
        found += [{"id": self.answered_ids[key], "problem": "unknown", "where": where}
                  for key, where in self.answers.items() if key not in self.input_ids]
        return found


def check_outputs(input_path: Path, outputs: list[Path]) -> ShardCheck:
    check = ShardCheck()
    name = input_path.name
    try:
        with open(input_path, encoding="utf-8") as handle:
            for line in read_patent_lines(handle, name):
                key = id_key(line.identifier)
                if key in check.input_ids:
                    raise InputError(f"{name} line {line.number}.id: {key} appears twice; ids must be unique")
                check.input_ids[key] = line.identifier
        for output in outputs:
            with open(output, encoding="utf-8", errors="replace") as handle:
                for number, text in enumerate(handle, start=1):
                    _count_line(check, text, f"{output.name} line {number}")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {getattr(error, 'filename', None) or input_path}: {error}") from None
    return check


def _count_line(check: ShardCheck, text: str, where: str) -> None:
    if not text.strip():
        return
    answer = answer_line(text)
    if answer is not None:
        key = id_key(answer["id"])
        check.answers[key].append(where)
        check.answered_ids[key] = answer["id"]
        return
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = None
    if text.endswith("\n") and isinstance(content, dict) and "id" in content and "error" in content:
        check.errors[id_key(content["id"])].append(where)
    else:
        check.unreadable_lines += 1


def check_command(args: argparse.Namespace) -> int:
    try:
        check = check_outputs(args.input, args.outputs)
    except InputError as error:
        print(f"cannot check: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problems = check.problems()
    for problem in problems:
        print(json.dumps(problem, ensure_ascii=False))
    by_kind: dict[str, list] = defaultdict(list)
    for problem in problems:
        by_kind[problem["problem"]].append(problem["id"])
    said = {
        "missing": "input ids no output answers", "failed": "input ids whose only lines are errors",
        "doubled": "input ids answered more than once", "unknown": f"answered ids that {args.input.name} does not have",
    }
    for kind, ids in by_kind.items():
        shown = ", ".join(json.dumps(identifier, ensure_ascii=False) for identifier in ids[:_SHOWN])
        print(f"{kind}: {len(ids)} {said[kind]}: {shown}{', …' if len(ids) > _SHOWN else ''}", file=sys.stderr)
    if check.unreadable_lines:
        print(f"{check.unreadable_lines} output lines are torn or not JSON (a run killed mid-write): --resume redoes them",
              file=sys.stderr)
    total = len(check.input_ids)
    if problems:
        print(f"incomplete: {total - len(by_kind['missing']) - len(by_kind['failed']) - len(by_kind['doubled'])} of "
              f"{total} ids of {args.input.name} answered exactly once in {len(args.outputs)} outputs", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"complete: all {total} ids of {args.input.name} answered exactly once in {len(args.outputs)} outputs", file=sys.stderr)
    return 0


def add_commands(commands, formatter_class) -> None:
    """``shards check``, on the CLI's subcommands."""
    shards = commands.add_parser("shards", help="a backlog split with classify --shard I/N: check its outputs",
                                 formatter_class=formatter_class)
    shard_commands = shards.add_subparsers(dest="shards_command", required=True)
    check = shard_commands.add_parser(
        "check", help="verify that the shard outputs answer every input line exactly once", description=__doc__,
        formatter_class=formatter_class,
    )
    check.add_argument("--input", type=Path, required=True, help="the JSON-lines file the shards were classified from")
    check.add_argument("--outputs", type=Path, nargs="+", required=True, help="every shard's output file")
    check.set_defaults(run=check_command)
