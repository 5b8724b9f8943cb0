"""The dead-stub watchdog's reading of tritonserver's children, from scripted looks at /proc:
a stub that died stays a zombie until the watchdog acts; one that Triton stopped on purpose (an
unload, or the reload after a re-export) is reaped moments after it exits, and is left alone,
unless Triton still calls its model ready with no stub left."""
import threading
import time

import pytest

from server import model_watchdog
from server.model_watchdog import DeadStubWatchdog, StubProcess
from tests.waiting import wait_until

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


def test_a_stub_killed_as_soon_as_the_watchdog_has_started_is_reloaded(monkeypatch):
    """Killed right after ``start()`` returns, before the watching thread's first look: a corpse
    has no command line to name its model, so ``start()`` has seen the stub running already."""
    killed, dead_looks = threading.Event(), []

    def children(_server_pid):
        if killed.is_set():
            dead_looks.append(1)
            return [(101, "Z")]
        return [(101, "S")]

    reloaded: list[str] = []
    watchdog = DeadStubWatchdog(server_pid=1, http_url="unused", poll_s=0.05, children_of=children,
                                stub_of=lambda pid: {101: STUB}.get(pid))
    monkeypatch.setattr(watchdog, "_recover", lambda stub, after: reloaded.append(stub.model))
    watchdog.start()
    killed.set()
    try:
        wait_until(lambda: len(dead_looks) >= 4, "four looks at the corpse", timeout_s=10)
    finally:
        watchdog.stop()
    assert reloaded == ["kscst-gemma2"]


def test_a_stub_that_died_before_any_look_saw_it_running_is_reported_not_guessed(monkeypatch, caplog):
    """Its corpse has no command line to name its model: an error says so, and nothing is reloaded."""
    assert watch(monkeypatch, [[(101, "Z")]] * 3) == []
    assert "a stub (pid 101) died before the watchdog saw it running" in caplog.text


def test_after_a_reload_the_next_look_comes_at_once(monkeypatch):
    """So the new stub is known from the moment its model is ready, not one poll interval later,
    in which it could die unseen."""
    looked_at: list[float] = []
    script = [[(101, "S")], [(101, "Z")], [(101, "Z")], [(103, "S")]]

    def children(_server_pid):
        looked_at.append(time.monotonic())
        return script[min(len(looked_at), len(script)) - 1]

    watchdog = DeadStubWatchdog(server_pid=1, http_url="unused", poll_s=1.0, children_of=children,
                                stub_of=lambda pid: StubProcess(pid, STUB.model, STUB.instance) if pid in (101, 103) else None)
    reloads: list[str] = []

    def reload(model, action):
        reloads.append(action)
        watchdog.poll_s = 3600.0  # from the reload on, a look that waited for a poll would not come in this test

    monkeypatch.setattr(watchdog, "_repository", reload)
    monkeypatch.setattr(watchdog, "_model_ready", lambda model: True)
    watchdog.start()
    try:
        wait_until(lambda: len(looked_at) >= 4, "the look after the reload, without waiting for a poll")
    finally:
        watchdog.stop()
    assert reloads == ["unload", "load"]
    assert watchdog.recoveries[0].ready and watchdog.state().watched == (StubProcess(103, STUB.model, STUB.instance),)


def test_stopping_returns_within_its_bound_while_a_reload_hangs(monkeypatch):
    """A reload of a large model takes minutes; a pod's shutdown must not wait for it (it waited up
    to reload_timeout_s, 600 s, past any termination grace period)."""
    script = [[(101, "S")], [(101, "Z")]]
    looks = []

    def children(_server_pid):
        looks.append(1)
        return script[min(len(looks), len(script)) - 1]

    watchdog = DeadStubWatchdog(server_pid=1, http_url="unused", poll_s=0.001, children_of=children,
                                stub_of=lambda pid: STUB if pid == 101 else None)
    entered, release = threading.Event(), threading.Event()

    def hanging_reload(model, action):
        entered.set()
        release.wait()

    monkeypatch.setattr(watchdog, "_repository", hanging_reload)
    watchdog.start()
    try:
        assert entered.wait(60), "the reload never started"
        stopper = threading.Thread(target=watchdog.stop)
        stopper.start()
        stopper.join(60)  # STOP_WAIT_S is 5: this waits for stop() to return, it does not time it
        assert not stopper.is_alive(), "stop() waited for the reload"
        assert not release.is_set()  # it returned while the reload still hung
    finally:
        release.set()


def test_children_are_read_from_this_machines_proc():
    """The real reading: this test's own process is a child of its parent, whatever its name's bytes."""
    import os

    assert os.getpid() in {pid for pid, _ in model_watchdog._children(os.getppid())}


def test_its_state_names_the_stubs_it_watches_and_where_a_look_that_never_returns_waits():
    """What a failure message shows: a look stuck in reading /proc (here: held) is seen in the
    watching thread's stack, with the seconds since the last finished look."""
    first_look_done, release = threading.Event(), threading.Event()

    def stuck_after_one_look(_server_pid):
        if first_look_done.is_set():
            release.wait(10)
        first_look_done.set()
        return [(101, "S")]

    watchdog = DeadStubWatchdog(server_pid=1, http_url="unused", poll_s=0.001, children_of=stuck_after_one_look,
                                stub_of=lambda pid: {101: STUB}.get(pid)).start()
    try:
        assert first_look_done.wait(10)
        time.sleep(0.2)
        state = watchdog.state()
        assert state.running and state.looks == 1 and state.watched == (STUB,)
        assert state.seconds_since_look > 0.1  # its one look ended as the 0.2 s of sleep began
        assert "in stuck_after_one_look" in state.where and "release.wait" in state.where
    finally:
        release.set()
        watchdog.stop()
    assert not watchdog.state().running and watchdog.state().where == ""
