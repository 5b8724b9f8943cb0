"""The dead-stub watchdog's reading of tritonserver's children, from scripted looks at /proc:
a stub that died stays a zombie until the watchdog acts; one that Triton stopped on purpose (an
unload, or the reload after a re-export) is reaped moments after it exits, and is left alone,
unless Triton still calls its model ready with no stub left."""
import threading
import time

import pytest

from server import model_watchdog
from server.model_watchdog import DeadStubWatchdog, StubProcess

STUB = StubProcess(pid=101, model="kscst-gemma2", instance="kscst-gemma2_0_0")
OTHER = StubProcess(pid=102, model="ipc-llama", instance="ipc-llama_0_0")


def watch(monkeypatch, looks: list, ready: bool = False) -> list[str]:
    """Run the watchdog over ``looks`` (each: (pid, state) of every child, or an exception the look
    raises), the last one repeated, with Triton calling every model ``ready``; returns the models
    it reloaded."""
    remaining, seen_all = list(looks), threading.Event()

    def children(_server_pid):
        if len(remaining) == 1:
            seen_all.set()
            return remaining[0]
        look = remaining.pop(0)
        if isinstance(look, Exception):
            raise look
        return look

    reloaded: list[str] = []
    watchdog = DeadStubWatchdog(server_pid=1, http_url="unused", poll_s=0.001, children_of=children,
                                stub_of=lambda pid: {101: STUB, 102: OTHER}.get(pid))
    monkeypatch.setattr(watchdog, "_recover", lambda stub, after: reloaded.append(stub.model))
    monkeypatch.setattr(watchdog, "_model_ready", lambda model: ready)
    watchdog.start()
    assert seen_all.wait(10)
    time.sleep(0.05)  # a few more looks at the last state
    watchdog.stop()
    return reloaded


def test_a_stub_that_died_is_reloaded_once(monkeypatch):
    alive = [(101, "S"), (102, "S")]
    dead = [(101, "Z"), (102, "S")]
    assert watch(monkeypatch, [alive, dead, dead, dead]) == ["kscst-gemma2"]


def test_a_stub_stopped_on_purpose_and_reaped_is_left_alone(monkeypatch):
    alive, exiting, reaped = [(101, "S"), (102, "S")], [(101, "Z"), (102, "S")], [(102, "S")]
    replaced = [(102, "S"), (103, "S")]  # the reload's new stub (not ours to know: no cmdline match)
    assert watch(monkeypatch, [alive, exiting, reaped, replaced]) == []


@pytest.mark.parametrize("corpse_looks", [2, 5])
def test_a_corpse_seen_on_two_looks_is_a_death_however_long_it_stays(monkeypatch, corpse_looks):
    alive, dead = [(101, "S")], [(101, "Z")]
    assert watch(monkeypatch, [alive] + [dead] * corpse_looks) == ["kscst-gemma2"]


def test_a_model_left_without_a_stub_that_triton_still_calls_ready_is_reloaded(monkeypatch):
    """Should Triton reap a dead stub before two looks see its corpse, the model it leaves READY
    with no stub is the sign; an unload (above) makes the model not ready first."""
    alive, gone = [(101, "S"), (102, "S")], [(102, "S")]
    assert watch(monkeypatch, [alive, gone, gone, gone], ready=True) == ["kscst-gemma2"]
    assert watch(monkeypatch, [alive, gone, gone, gone], ready=False) == []


def test_a_look_that_fails_does_not_end_the_watching(monkeypatch):
    alive, dead = [(101, "S")], [(101, "Z")]
    assert watch(monkeypatch, [alive, OSError("/proc went away"), ValueError("garbled stat"), dead, dead]) == ["kscst-gemma2"]


def test_children_are_read_from_this_machines_proc():
    """The real reading: this test's own process is a child of its parent, whatever its name's bytes."""
    import os

    assert os.getpid() in {pid for pid, _ in model_watchdog._children(os.getppid())}
