"""The Triton adapter's request flow without Triton: every request of an ``execute`` call gets
exactly one final response, whatever raises where; an engine that dies takes its stub down
only after failing and answering what it held."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np

from core.engine import DocumentScores
from patent_classifier_client.errors import EngineFailure, InvalidInput, Overloaded, ServerUnavailable
from core.labels import Label, LabelSet
from patent_classifier_client.protocol import ClassifyRequest
from server.dead_engine_exit import DeadEngineExit
from server.request_dispatch import RequestDispatch

LABELS = LabelSet(tuple(Label(f"C{index}", f"class {index}") for index in range(3)))


class Sender:
    def __init__(self):
        self.sent: list[tuple[str, object]] = []

    def is_cancelled(self) -> bool:
        return False


class RecordingReplies:
    def __init__(self, failing_answer_for: Sender | None = None):
        self.failing_answer_for = failing_answer_for

    def answer(self, sender, tensors):
        if sender is self.failing_answer_for:
            raise RuntimeError("the stub's IPC failed")
        sender.sent.append(("answer", tensors))

    def refuse(self, sender, error):
        sender.sent.append(("refuse", error))


class NoMetrics:
    def request_received(self): ...
    def answered(self, scores, seconds): ...
    def failed(self, kind, seconds): ...


class FlakyEngine:
    """Answers at once, except that submit raises a plain exception for some texts and a
    typed one for others, and one future fails after being handed on."""

    def __init__(self):
        self.submitted = 0

    def submit(self, texts, deadline=None, is_cancelled=None):
        self.submitted += 1
        future: Future = Future()
        if texts == ["crash"]:
            raise RuntimeError("a bug in the engine")
        if texts == ["full"]:
            raise Overloaded("queue full")
        if texts == ["late failure"]:
            future.set_exception(EngineFailure("the model failed on this batch"))
            return future
        future.set_result([DocumentScores(np.array([0.2, 0.5, 0.3], np.float32), 3, False) for _ in texts])
        return future


def reader(text: str):
    def read():
        if text == "bad":
            raise InvalidInput("TEXT[0]", "is empty")
        if text == "undecodable":
            raise UnicodeError("a bug in decoding")
        return ClassifyRequest([text], top_k=2), None
    return read


def test_every_request_of_a_call_gets_exactly_one_response_whatever_raises():
    texts = ["fine", "crash", "fine", "bad", "full", "undecodable", "late failure", "fine", "answer fails"]
    senders = [Sender() for _ in texts]
    replies = RecordingReplies(failing_answer_for=senders[-1])
    dispatch = RequestDispatch(FlakyEngine(), LABELS, replies, NoMetrics())
    for sender, text in zip(senders, texts):  # one execute() call's requests
        dispatch.accept(sender, reader(text))
    dispatch.send_queued(timeout_s=10)
    dispatch.stop()

    outcomes = [[kind for kind, _ in sender.sent] for sender in senders]
    assert outcomes[:-1] == [["answer"], ["refuse"], ["answer"], ["refuse"], ["refuse"], ["refuse"], ["refuse"], ["answer"]]
    assert outcomes[-1] == []  # its send raised: logged, and the thread went on to the others
    errors = {text: sender.sent[0][1] for text, sender in zip(texts, senders) if sender.sent and sender.sent[0][0] == "refuse"}
    assert isinstance(errors["crash"], EngineFailure) and "internal error: RuntimeError" in errors["crash"].message
    assert isinstance(errors["undecodable"], EngineFailure)
    assert isinstance(errors["bad"], InvalidInput) and isinstance(errors["full"], Overloaded)
    assert isinstance(errors["late failure"], EngineFailure)
    answer = senders[0].sent[0][1]
    assert [code.decode() for code in answer["LABEL_CODE"][0]] == ["C1", "C2"]


class DyingEngine:
    """Healthy until told otherwise; holds one request that only stop() completes."""

    def __init__(self):
        self.healthy = True
        self.held: Future = Future()
        self.stopped = threading.Event()

    def is_healthy(self):
        return self.healthy

    def stop(self, drain_timeout_s=30.0):
        self.held.set_exception(ServerUnavailable("the engine stopped"))
        self.stopped.set()


def test_a_dead_engine_fails_what_it_held_sends_the_answers_then_exits():
    engine, exits, order = DyingEngine(), [], []
    watch = DeadEngineExit(engine, lambda timeout_s: order.append("answers sent"),
                           exit_process=lambda code: (order.append("exit"), exits.append(code)),
                           engine_dead=lambda: order.append("health gauge 0"), quiesce=lambda: order.append("quiet"))
    time.sleep(1.2)
    assert not exits  # healthy: nothing happens
    engine.healthy = False
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stopped.is_set() and isinstance(engine.held.exception(), ServerUnavailable)
    assert order == ["health gauge 0", "answers sent", "quiet", "exit"] and exits == [70]
    watch.stop()


def test_a_deliberate_stop_never_exits():
    engine, exits = DyingEngine(), []
    watch = DeadEngineExit(engine, lambda timeout_s: None, exit_process=exits.append)
    watch.stop()
    engine.healthy = False
    time.sleep(1.2)
    assert not exits


def test_closing_waits_for_the_reply_on_its_way_and_sends_none_after():
    """Before a dead engine's stub exits: a stub that exits in the middle of a reply can leave a lock
    of tritonserver's shared memory held, and tritonserver aborts (boost::interprocess::lock_exception)."""
    in_reply, release = threading.Event(), threading.Event()

    class SlowReplies(RecordingReplies):
        def refuse(self, sender, error):
            in_reply.set()
            release.wait(10)
            super().refuse(sender, error)

    dispatch = RequestDispatch(FlakyEngine(), LABELS, SlowReplies(), NoMetrics())
    on_its_way, after = Sender(), Sender()
    replying = threading.Thread(target=dispatch.accept, args=(on_its_way, reader("bad")))
    replying.start()
    assert in_reply.wait(10)
    closing = threading.Thread(target=dispatch.close)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive()  # the reply on its way holds it
    release.set()
    closing.join(10)
    replying.join(10)
    assert not closing.is_alive() and [kind for kind, _ in on_its_way.sent] == ["refuse"]
    dispatch.accept(after, reader("bad"))
    dispatch.accept(after, reader("fine"))
    dispatch.send_queued(10)
    assert after.sent == []
    dispatch.stop()
