"""An engine that can no longer answer takes its stub process down, so the model comes back.

An engine dies for good when its loop thread dies (a bug), when its device stops computing (a
sticky CUDA error), when a forward pass runs past ``max_forward_pass_s`` (a hung device), or when
vLLM's engine-core process dies (``EngineDeadError``): every later request would then fail at
once, or wait forever, while Triton keeps reporting the model READY. Inside the Python backend
no call turns a model not-ready, but a stub that exits does: Triton then refuses the model's
requests as "not healthy", and the launcher's watchdog (server/model_watchdog.py) unloads and
loads the model with a new stub and a new engine, the same recovery as for a stub killed from
outside.

Before exiting, the requests the engine still held are failed with a clear error and every
answer already queued is sent, so no caller is left waiting for a stub that is gone. Then every
thread of ours that talks to tritonserver through the stub's shared memory (answers, metrics) is
stopped and waited for: a process that exits while holding one of that memory's locks makes
tritonserver abort (``boost::interprocess::lock_exception``), taking every model it serves down.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from core.engine import ClassificationEngine

log = logging.getLogger("patent_classifier.triton")

POLL_S = 0.5
DRAIN_S = 5.0  # for the engine to fail what it held, and again for the answers to go out
CLEANUP_LIMIT_S = 4 * DRAIN_S
EXIT_CODE = 70  # EX_SOFTWARE


class DeadEngineExit:
    def __init__(
        self, engine: ClassificationEngine, send_queued_answers: Callable[[float], None],
        exit_process: Callable[[int], None] = os._exit, engine_dead: Callable[[], None] = lambda: None,
        quiesce: Callable[[], None] = lambda: None,
    ):
        """``engine_dead``: called first once the engine is found dead (the health gauge reads 0 at once).
        ``quiesce``: called last before the exit; returns once no thread of ours talks to tritonserver."""
        self._engine, self._send_queued_answers, self._exit_process = engine, send_queued_answers, exit_process
        self._engine_dead, self._quiesce = engine_dead, quiesce
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dead-engine-exit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Before a deliberate shutdown, which also makes the engine unhealthy."""
        self._stopped.set()
        self._thread.join(timeout=2 * POLL_S)

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            if not self._engine.is_healthy():
                break
        else:
            return
        log.error("the engine can no longer answer; failing what it held and ending this stub so the model is reloaded")
        try:
            self._engine_dead()
        except Exception:
            log.exception("reporting the dead engine failed")
        # On a thread of its own: a dead engine's shutdown may hang, and the exit must come anyway.
        cleanup = threading.Thread(target=self._fail_and_answer_what_is_left, name="dead-engine-cleanup", daemon=True)
        cleanup.start()
        cleanup.join(timeout=CLEANUP_LIMIT_S)
        if not self._stopped.is_set():
            self._exit_process(EXIT_CODE)

    def _fail_and_answer_what_is_left(self) -> None:
        try:
            self._engine.stop(drain_timeout_s=DRAIN_S)
            self._send_queued_answers(DRAIN_S)
        except Exception:
            log.exception("failing the dead engine's requests did not finish")
        try:
            self._quiesce()
        except Exception:
            log.exception("stopping the threads that talk to tritonserver did not finish")
