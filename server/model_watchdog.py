"""Bring a model back when its Python-backend stub process dies, without restarting tritonserver.

What tritonserver 2.51 (python_backend r24.10) does on its own when a stub dies (SIGKILL,
out-of-memory kill, a crash in native code), seen here and in its source: it keeps reporting
the model READY, fails every new request at once with INTERNAL "Stub process '<instance>' is not
healthy.", never restarts the stub (``TRITONBACKEND_ModelInstanceExecute`` has only a TODO for
it), and never answers the requests that the dead stub held: their response factories lived in
the dead process, so those clients wait for their own deadline. A reload with unchanged files is
a no-op, so the watchdog unloads the model (it turns not-ready) and loads it again, which starts
a new stub. The server must run with ``--model-control-mode=explicit`` for the repository API.

A stub that died is told apart from one that Triton stopped on purpose (an unload, a reload
after a re-export, a new version) by its corpse: Triton reaps a stub it stops (``waitpid``)
moments after it exits, but one that died stays a zombie child of tritonserver until the
instance is destroyed. So a corpse counts only when it is still there at the next look. Should
Triton ever reap a dead stub before that, the model it leaves behind tells: still READY with no
stub, where an unload first makes it not ready and a reload starts the new stub before it ends
the old. One look that fails (a process vanishing under it) is logged, and the watching goes on.

A corpse's command line is empty, so a stub is known (its model, its instance) only once a look
has seen it running: the first look is taken before ``start()`` returns, and the one after a
reload at once. A stub that a load started and that died before the next look is reported, not
reloaded.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

STUB_EXECUTABLE = "triton_python_backend_stub"
# How long stop() waits for a look or a reload in progress: well inside a pod's termination grace
# (the chart's is --exit-timeout + 30 s, and Triton's own drain comes after this), where a reload
# of a large model can take minutes. A reload left behind fails with the server it talks to.
STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class StubProcess:
    pid: int
    model: str
    instance: str


@dataclass(frozen=True)
class Recovery:
    model: str
    dead_stub_pid: int
    detected_after_s: float  # from the watchdog's previous look (stub alive) to noticing the corpse
    reload_seconds: float  # unload + load, until the model answered ready again
    ready: bool


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The running (not dead) Python-backend stubs of a tritonserver."""
    return [stub for pid, state in _children(server_pid) if state != "Z" and (stub := _stub_of(pid)) is not None]


def answers_200(url: str, timeout_s: float) -> bool:
    """A GET of ``url`` answers 200 (a refused connection, a timeout or another status: no)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def process_tree(root_pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``root_pid``: the stubs, and what they started (vLLM's engine core)."""
    tree, pending = [], [root_pid]
    while pending:
        for pid, _ in _children(pending.pop()):
            start = _start_time(pid)
            if start is not None:
                tree.append((pid, start))
                pending.append(pid)
    return tree


def process_group(group_id: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live process in process group ``group_id``: what a tritonserver
    started in a session of its own started (its stubs, their vLLM engine cores), wherever the
    kernel has moved them since; orphans keep their group when their parent exits."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat_fields(int(name))) is not None and fields[2] == str(group_id) and fields[0] != "Z":
            members.append((int(name), fields[19]))
    return members


def end_leftovers(tree: list[tuple[int, str]], timeout_s: float = 30.0) -> list[int]:
    """SIGKILL the processes of ``tree`` that outlived their server (a stub Triton gave up on at
    its exit timeout holds the model's memory until it is ended). The start time tells a
    leftover from a new process that reuses its pid. Returns once they have exited (or after
    ``timeout_s``, logged)."""
    ended = []
    for pid, start in tree:
        if still_running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append((pid, start))
            except ProcessLookupError:
                pass
    if ended:
        log.warning("ended %d processes that outlived tritonserver: %s", len(ended), [pid for pid, _ in ended])
    # SIGKILL only starts the exit: a process freeing a model's memory is still running for a
    # while, and the caller may start the next server on that memory as soon as this returns.
    deadline = time.monotonic() + timeout_s
    while (left := [pid for pid, start in ended if still_running(pid, start)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        log.error("processes still exiting %.0f s after SIGKILL: %s", timeout_s, left)
    return [pid for pid, _ in ended]


def still_running(pid: int, start: str) -> bool:
    """The process of ``process_tree``'s entry is still there, and not a corpse."""
    fields = _stat_fields(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return None if fields is None else fields[19]


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state first, parent pid next, process group, ..., start time at index 19.
    Read as bytes: a command name cut at 15 bytes may end inside a UTF-8 character."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].decode("ascii").split()
    except (OSError, IndexError, UnicodeDecodeError):  # exited while we looked, or not a process's stat
        return None
    return fields if len(fields) > 19 else None


def _children(parent_pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is ``parent_pid``."""
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat_fields(int(name))) is not None and fields[1] == str(parent_pid):
            children.append((int(name), fields[0]))
    return children


def _stub_of(pid: int) -> StubProcess | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # triton_python_backend_stub <repository>/<model>/<version>/model.py <shm> <sizes> <parent pid> <backend dir> <ipc> <instance> ...
    if len(argv) < 9 or not argv[0].decode(errors="replace").endswith(STUB_EXECUTABLE):
        return None
    model_py = Path(argv[1].decode(errors="replace"))
    return StubProcess(pid, model_py.parent.parent.name, argv[8].decode(errors="replace"))


@dataclass(frozen=True)
class WatchdogState:
    """What a watchdog knows at one moment, for a log line or a failure message."""

    running: bool
    looks: int  # finished, since start
    seconds_since_look: float | None  # None: none finished yet
    watched: tuple[StubProcess, ...]  # the stubs it has seen running
    corpses: tuple[int, ...]  # seen dead once, to be confirmed at the next look
    where: str  # the watching thread's stack now ("" when it is not running)


@dataclass
class _Looks:
    """What the watchdog remembers from one look to the next."""

    looked_at: float
    live: dict[int, StubProcess] = field(default_factory=dict)  # stubs seen running, by pid (a zombie's cmdline is empty)
    corpses: dict[int, float] = field(default_factory=dict)  # children seen dead once, and the look before that
    handled: set[int] = field(default_factory=set)
    without_stub: dict[str, tuple[StubProcess, int]] = field(default_factory=dict)  # model: its last stub, looks since it went


class DeadStubWatchdog:
    """Polls tritonserver's children; reloads the model of any stub that died. ``recoveries`` records each."""

    def __init__(self, server_pid: int, http_url: str, headers: dict[str, str] | None = None, poll_s: float = 0.5,
                 reload_timeout_s: float = 600.0, children_of: Callable[[int], list[tuple[int, str]]] = _children,
                 stub_of: Callable[[int], StubProcess | None] = _stub_of):
        self.server_pid, self.http_url, self.headers = server_pid, http_url, headers or {}
        # How /proc is read: injected by the tests, which script the looks of this watchdog alone
        # (every server of a test session runs its own watchdog thread beside them).
        self._children_of, self._stub_of = children_of, stub_of
        self.poll_s, self.reload_timeout_s = poll_s, reload_timeout_s
        self.recoveries: list[Recovery] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._looks = _Looks(time.monotonic())
        self._finished_looks, self._last_look_at = 0, None
        self._look_at_once = False  # after a reload: its new stub is known from the next moment, not one poll later

    def start(self) -> "DeadStubWatchdog":
        """Takes the first look before it returns: a stub is known only once seen running (a
        corpse has no command line to name its model), so one that died before a first look in
        the background would never be reloaded."""
        self._look_once()
        self._thread = threading.Thread(target=self._watch, name="stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops watching; returns within STOP_WAIT_S, even with a reload in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                log.warning("stub watchdog: stopped while a look or a reload was in progress; not waiting for it")

    def state(self) -> WatchdogState:
        running = self._thread is not None and self._thread.is_alive()
        frame = sys._current_frames().get(self._thread.ident) if running else None
        return WatchdogState(
            running, self._finished_looks,
            None if self._last_look_at is None else time.monotonic() - self._last_look_at,
            tuple(self._looks.live.values()), tuple(self._looks.corpses),
            "".join(traceback.format_stack(frame)) if frame is not None else "",
        )

    def _watch(self) -> None:
        while not self._stop.wait(0.0 if self._look_at_once else self.poll_s):
            self._look_at_once = False
            self._look_once()

    def _look_once(self) -> None:
        try:
            self._look(self._looks)
        except Exception:  # one failed look must not end the watching: the next one may see a death
            log.exception("stub watchdog: a look at tritonserver's children failed; looking again")
        self._finished_looks, self._last_look_at = self._finished_looks + 1, time.monotonic()

    def _look(self, looks: "_Looks") -> None:
        children = self._children_of(self.server_pid)
        now = time.monotonic()
        for pid, state in children:
            if state == "Z" and pid not in looks.handled:
                if pid not in looks.corpses:  # perhaps stopped on purpose and not yet reaped: look again
                    looks.corpses[pid] = looks.looked_at
                    continue
                looks.handled.add(pid)
                previous_look = looks.corpses.pop(pid)  # the last that saw it running, if one did
                if pid in looks.live:
                    self._recover(looks.live.pop(pid), now - previous_look)
                else:  # started and dead between two looks (a model loaded through the repository API)
                    log.error("a stub (pid %d) died before the watchdog saw it running: its corpse does not name "
                              "its model; reload that model through the repository API, or restart the server", pid)
            elif state != "Z" and pid not in looks.live and (stub := self._stub_of(pid)) is not None:
                looks.live[pid] = stub
        present = {pid for pid, _ in children}
        alive = {pid for pid, state in children if state != "Z"}
        looks.corpses = {pid: seen for pid, seen in looks.corpses.items() if pid in present}  # reaped: stopped on purpose
        gone = [stub for pid, stub in looks.live.items() if pid not in alive and pid not in looks.corpses]
        looks.live = {pid: stub for pid, stub in looks.live.items() if pid in alive or pid in looks.corpses}
        looks.handled &= present
        self._look_for_reaped_deaths(looks, gone)
        looks.looked_at = time.monotonic()

    def _look_for_reaped_deaths(self, looks: "_Looks", gone: list[StubProcess]) -> None:
        """A stub that left no corpse was reaped: stopped on purpose (then its model is unloading, or
        a new stub has replaced it) or, should Triton reap a dead one, died. So a model whose stubs
        are all gone, none back on the next look, that Triton still calls ready, lost its stub."""
        for stub in gone:
            looks.without_stub.setdefault(stub.model, (stub, 0))
        for model, (stub, counted) in list(looks.without_stub.items()):
            if any(live.model == model for live in looks.live.values()):
                del looks.without_stub[model]  # replaced, or still a corpse the rule above handles
            elif counted < 1:
                looks.without_stub[model] = (stub, counted + 1)
            else:
                del looks.without_stub[model]
                if self._model_ready(model):
                    self._recover(stub, 2 * self.poll_s)

    def _recover(self, stub: StubProcess, detected_after_s: float) -> None:
        log.error("stub %d of model %s (%s) died; reloading the model", stub.pid, stub.model, stub.instance)
        started = time.monotonic()
        ready = False
        try:
            for action in ("unload", "load"):
                if self._stop.is_set():  # shutting down: the server is going, and its models with it
                    return
                self._repository(stub.model, action)
            ready = self._model_ready(stub.model)
        except (urllib.error.URLError, OSError) as exc:
            log.error("reloading model %s failed: %s", stub.model, exc)
        self._look_at_once = True
        recovery = Recovery(stub.model, stub.pid, detected_after_s, time.monotonic() - started, ready)
        self.recoveries.append(recovery)
        log.warning("model %s %s %.1f s after its stub died", stub.model, "ready again" if ready else "NOT ready",
                    recovery.detected_after_s + recovery.reload_seconds)

    def _repository(self, model: str, action: str) -> None:
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/{action}", data=json.dumps({}).encode(),
            headers={"Content-Type": "application/json", **self.headers}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.reload_timeout_s):
            pass

    def _model_ready(self, model: str) -> bool:
        return answers_200(f"http://{self.http_url}/v2/models/{model}/ready", timeout_s=5)
