"""A test hook: hold an engine's scheduling so a test knows where every request is.

Tests of what happens to queued work (cancellation, deadlines) must not depend on how fast a
machine computes the requests ahead. With ``PATENT_CLASSIFIER_HOLD_FILE`` naming a file in
the server's environment, an engine takes no new work while that file exists (the PyTorch
engine no batch from its queue; the vLLM engine hands nothing to vLLM): requests wait,
however fast the machine, until the test removes the file or the engine stops.
Unset, as in every real deployment, it is never looked at.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

HOLD_FILE_ENV = "PATENT_CLASSIFIER_HOLD_FILE"
POLL_S = 0.01


class EngineHold:
    def __init__(self, hold_file: Path | None):
        self.hold_file = hold_file

    @classmethod
    def from_environment(cls) -> "EngineHold":
        value = os.environ.get(HOLD_FILE_ENV, "").strip()
        return cls(Path(value) if value else None)

    def is_held(self) -> bool:
        return self.hold_file is not None and self.hold_file.exists()

    def wait_while_held(self, stopping: Callable[[], bool]) -> None:
        while self.is_held() and not stopping():
            time.sleep(POLL_S)
