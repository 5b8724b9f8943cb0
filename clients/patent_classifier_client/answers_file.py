"""The output file of ``python -m patent_classifier_client classify``: one JSON line per input line, and what an
interrupted run already answered, so ``--resume`` continues it with nothing lost or done twice.

Each batch's lines go to the file in one write and are flushed, so a run killed at any moment
leaves whole lines and at most one torn last line. On resume, only whole lines that carry an
answer count: a torn line and the error lines of the earlier run are dropped (the file is
rewritten without them, through a temporary file and a rename, so a second kill loses nothing)
and their documents are sent again.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO


def id_key(identifier: object) -> str:
    """Ids compare as JSON values: the id 7 and the id "7" are two ids."""
    return json.dumps(identifier, ensure_ascii=False)


class AnswersFile:
    """``path`` None writes to standard output (nothing to resume there)."""

    def __init__(self, path: Path | None, resume: bool = False):
        self.path = path
        self.answered: set[str] = set()  # id_key of each id a kept line answers
        self.dropped = 0  # lines of an earlier run that will be redone
        if path is None:
            self._handle: TextIO = sys.stdout
            return
        if resume and path.exists():
            self._keep_answered_lines()
        path.parent.mkdir(parents=True, exist_ok=True)  # a shard's folder on a fresh volume
        self._handle = open(path, "a" if resume else "w", encoding="utf-8")

    def _keep_answered_lines(self) -> None:
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                answer = answer_line(line)
                if answer is None or id_key(answer["id"]) in self.answered:
                    self.dropped += 1
                    continue
                self.answered.add(id_key(answer["id"]))
                kept.append(line)
        if self.dropped:
            partial = self.path.with_name(self.path.name + ".resuming")
            partial.write_text("".join(kept), encoding="utf-8")
            os.replace(partial, self.path)

    def write(self, lines: list[dict]) -> None:
        self._handle.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        self._handle.flush()

    def close(self) -> None:
        if self.path is not None:
            self._handle.close()


def answer_line(line: str) -> dict | None:
    """The line's content if it is whole and holds an answer; None for a torn, unreadable or error line."""
    if not line.endswith("\n"):
        return None
    try:
        content = json.loads(line)
    except json.JSONDecodeError:
        return None
    return content if isinstance(content, dict) and "id" in content and "labels" in content else None
