"""The dead-stub watchdog's reading of tritonserver's children, from scripted looks at /proc:
a stub that died stays a zombie until the watchdog acts; one that Triton stopped on purpose (an
unload, or the reload after a re-export) is reaped moments after it exits, and is left alone."""
import threading
import time

import pytest

from server import model_watchdog
from server.model_watchdog import DeadStubWatchdog, StubProcess

STUB = StubProcess(pid=101, model="kscst-gemma2", instance="kscst-gemma2_0_0")
OTHER = StubProcess(pid=102, model="ipc-llama", instance="ipc-llama_0_0")


def watch(monkeypatch, looks: list[list[tuple[int, str]]]) -> list[str]:
    """Run the watchdog over ``looks`` (each: (pid, state) of every child), the last one repeated;
    returns the models it reloaded."""
    remaining, seen_all = list(looks), threading.Event()

    def children(_server_pid):
        if len(remaining) == 1:
            seen_all.set()
            return remaining[0]
        return remaining.pop(0)

    monkeypatch.setattr(model_watchdog, "_children", children)
    monkeypatch.setattr(model_watchdog, "_stub_of", lambda pid: {101: STUB, 102: OTHER}.get(pid))
    reloaded: list[str] = []
    watchdog = DeadStubWatchdog(server_pid=1, http_url="unused", poll_s=0.001)
    monkeypatch.setattr(watchdog, "_recover", lambda stub, after: reloaded.append(stub.model))
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
