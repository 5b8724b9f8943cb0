"""The PyTorch engine on its own: admission, deadlines, cancellation, batching across submissions,
and the faults it contains (a device that stops computing, a hung forward pass, an overflow)."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from core import causal_flex_attention
from patent_classifier_client.errors import Cancelled, DeadlineExceeded, EngineFailure, Overloaded, ServerUnavailable
from core.synthetic_patents import synthetic_patents
from tests.conftest import MAX_LENGTH, held_engines
from tests.waiting import wait_until

pytestmark = pytest.mark.model  # the PyTorch engine over the exported demo


LONG_TEXTS = [d.render() for d in synthetic_patents(48, seed=21, long_share=1.0)]


def computed_documents(engine) -> int:
    return sum(batch.documents for batch in engine.batches)


def submit_concurrently_and_match_offline(engine, reference, documents: list[str], threads: int) -> None:
    """One document per submission from ``threads`` callers; each answer is offline's (fp32, eager)."""
    with ThreadPoolExecutor(threads) as pool:
        futures = list(pool.map(lambda text: engine.submit([text]), documents))
    for text, future in zip(documents, futures):
        (scores,) = future.result(timeout=300)
        reference.assert_matches(text, scores.probabilities)
        assert scores.token_count == reference.logits(text)[1]


def test_submissions_share_batches_and_each_gets_its_own_scores(engine_factory, reference):
    engine = engine_factory(max_batch_tokens=8192)
    submit_concurrently_and_match_offline(engine, reference, [d.render() for d in synthetic_patents(16, seed=4, long_share=0.5)], 8)
    assert computed_documents(engine) == 16
    assert len(engine.batches) < 16  # requests really were computed together
    for batch in engine.batches:
        assert batch.padded_tokens <= 8192 and 0 <= batch.padding_ratio < 1
        assert batch.compute_seconds > 0 and all(wait >= 0 for wait in batch.queue_seconds)


def test_compiled_attention_compiles_at_start_and_never_while_serving(engine_factory, reference):
    # The GPU's attention (causal_flex), here on the CPU: every batch shape the scheduler forms
    # afterwards runs on the graphs compiled before start() returned, with offline's answers.
    engine = engine_factory(attention=causal_flex_attention.NAME, pad_to_multiple_of=64, max_batch_tokens=4096)
    compiled_at_start = causal_flex_attention.compiled_graphs()
    submit_concurrently_and_match_offline(engine, reference, [d.render() for d in synthetic_patents(20, seed=8, long_share=0.4)], 6)
    assert len({(batch.documents, batch.padded_tokens) for batch in engine.batches}) >= 3
    assert causal_flex_attention.compiled_graphs() == compiled_at_start


def test_a_full_queue_refuses_at_once(engine_factory):
    # Held, the engine takes nothing from its queue: four full-length patents fill it, whatever
    # the machine's speed, and everything after them is refused without waiting for compute.
    engine = engine_factory(max_queue_tokens=4 * MAX_LENGTH, max_batch_tokens=MAX_LENGTH)
    with held_engines():
        backlog = [engine.submit([text]) for text in LONG_TEXTS[:8]]
        refused = engine.submit(LONG_TEXTS[8:12])
        with pytest.raises(Overloaded, match="max_queue_tokens=2048"):
            refused.result(timeout=0)
        assert [f.done() for f in backlog] == [False] * 4 + [True] * 4
    assert all(f.exception(timeout=120) is None for f in backlog[:4])  # what fitted was served
    assert all(isinstance(f.exception(), Overloaded) for f in backlog[4:])  # the overflow was refused, not dropped


def test_expired_requests_are_never_computed(engine_factory):
    engine = engine_factory()
    with held_engines():  # queued, and still queued when the deadline passes
        backlog = engine.submit(LONG_TEXTS[:8])
        deadline = time.monotonic() + 0.05
        late = engine.submit(LONG_TEXTS[32:36], deadline=deadline)
        while time.monotonic() <= deadline:
            time.sleep(0.01)
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=120)
    assert len(backlog.result(timeout=300)) == 8
    assert computed_documents(engine) == 8
    assert sum(batch.expired for batch in engine.batches) == 4


def test_cancelled_requests_are_never_computed(engine_factory):
    engine = engine_factory()
    probe_calls = threading.Event()

    def client_hung_up() -> bool:
        probe_calls.set()
        return True

    with held_engines():  # both are still queued when the engine looks
        backlog = engine.submit(LONG_TEXTS[:8])
        withdrawn = engine.submit(LONG_TEXTS[32:36])
        assert withdrawn.cancel()
        hung_up = engine.submit(LONG_TEXTS[36:40], is_cancelled=client_hung_up)
    with pytest.raises(Cancelled):
        hung_up.result(timeout=120)
    assert probe_calls.is_set()
    assert len(backlog.result(timeout=300)) == 8
    assert computed_documents(engine) == 8


def test_stop_answers_everything_queued(engine_factory):
    engine = engine_factory()
    futures = [engine.submit([text]) for text in LONG_TEXTS[:6]]
    engine.stop(drain_timeout_s=120)
    assert all(f.done() and f.exception() is None for f in futures)
    assert not engine.is_healthy()


def test_forward_passes_run_with_the_configured_cpu_threads(engine_factory, reference):
    """Three threads: neither what torch picks by default on a 2-core machine nor what another engine
    in this process asked for, so the count is this engine's own."""
    one, three = engine_factory(cpu_threads=1), engine_factory(cpu_threads=3)
    for engine, threads in ((one, 1), (three, 3)):
        (scores,) = engine.submit([LONG_TEXTS[0]]).result(timeout=120)
        reference.assert_matches(LONG_TEXTS[0], scores.probabilities)
        assert engine.cpu_threads == threads


def test_gemma2_on_the_cpu_computes_packed_batches_with_padded_batches_answers(engine_factory, reference):
    """The same concurrent submissions through both layouts: packed batches (the default here)
    compute no padding and count real tokens against the budget; both give offline's answers."""
    texts = [d.render() for d in synthetic_patents(12, seed=17, long_share=0.5)]
    packed, padded = engine_factory(max_batch_tokens=1024), engine_factory(max_batch_tokens=1024, packing="off")
    for engine in (packed, padded):
        submit_concurrently_and_match_offline(engine, reference, texts, 8)
        assert computed_documents(engine) == 12 and len(engine.batches) < 12
    assert all(b.padded_tokens == b.real_tokens <= 1024 for b in packed.batches)
    assert sum(b.padded_tokens for b in padded.batches) > sum(b.real_tokens for b in padded.batches)


def test_the_engine_reports_what_it_resolved_and_what_it_holds(engine_factory):
    """The engine contract's own facts: the device and dtype it runs in, its start-up time, and
    the queue depth, which counts what is admitted and not yet in a batch (held here, so it stays
    queued however fast the machine)."""
    engine = engine_factory(dtype="bfloat16")
    assert (engine.device, engine.dtype) == ("cpu", "bfloat16")
    assert engine.startup_seconds > 0
    assert engine.queue_depth() == (0, 0)
    with held_engines():
        futures = [engine.submit(LONG_TEXTS[:2]), engine.submit(LONG_TEXTS[2:3])]
        assert engine.queue_depth() == (3, 3 * MAX_LENGTH)  # every long patent is cut at MAX_LENGTH
    assert all(len(future.result(timeout=120)) == count for future, count in zip(futures, (2, 1)))
    assert engine.queue_depth() == (0, 0)


# --- OpenMP's threads belong to the compute thread ------------------------------------------------

# In a fresh interpreter: the threads of the process after a parallel torch operator (a sum of 4 M
# elements, split among 2 OpenMP threads) on a thread that ends, then on the main thread.
_TEAMS_SCRIPT = """
import os
import torch
from server.cpu_share import on_a_thread_that_ends
from tests.waiting import wait_until
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
on_a_thread_that_ends(lambda: torch.ones(1 << 22).sum(), "work")
wait_until(lambda: threads() == before, "the ended thread's OpenMP worker to exit", timeout_s=10)
torch.ones(1 << 22).sum()
print(before, threads())
"""


def test_a_thread_that_ends_takes_its_openmp_team_with_it():
    """Why the engine loads on such a thread (server/cpu_share.py): a thread that lives on, here
    the main one, keeps its team, whose worker is one more thread of the process."""
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    ran = subprocess.run([sys.executable, "-c", _TEAMS_SCRIPT], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    before, after_main = map(int, ran.stdout.split())
    assert after_main == before + 1


def test_the_engine_loads_on_a_thread_that_has_ended_before_it_serves(engine_factory, monkeypatch):
    """So the compute thread's OpenMP workers are the process's only ones, and spin between
    operators instead of sleeping (server/cpu_share.py); a failed load still fails start()."""
    from server import torch_engine

    loaders = []
    load = torch_engine.load_sequence_classifier

    def recorded_load(*args, **kwargs):
        loaders.append(threading.current_thread())
        return load(*args, **kwargs)

    monkeypatch.setattr(torch_engine, "load_sequence_classifier", recorded_load)
    engine = engine_factory()
    assert len(loaders) == 1 and loaders[0] is not threading.current_thread() and not loaders[0].is_alive()
    assert len(engine.submit(LONG_TEXTS[:2]).result(timeout=120)) == 2

    def failed_load(*args, **kwargs):
        raise OSError("model.safetensors: input/output error")

    monkeypatch.setattr(torch_engine, "load_sequence_classifier", failed_load)
    with pytest.raises(OSError, match="input/output error"):
        engine_factory()


# --- faults: a dead device, a hung forward pass, an overflow, overload ------------------------------

STICKY_CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


def test_a_fault_of_one_batch_fails_that_batch_and_a_device_that_stops_computing_kills_the_engine(engine_factory, monkeypatch):
    """Rehearsed on the CPU: the model raises what a sticky CUDA error raises, and the device
    probe answers as such a device would (every later operation fails). A fault the device
    survives stays the batch's own."""
    from server import torch_engine

    engine = engine_factory()
    assert torch_engine.device_computes(torch_engine.torch.device("cpu"))  # the real probe, on a working device
    device = {"computes": True}
    forward_calls, probes = [], []

    def failing_model(batch):
        forward_calls.append(len(batch.documents))
        raise RuntimeError(STICKY_CUDA_ERROR)

    def probe(which):
        probes.append(which)
        return device["computes"]

    real_model = engine._logits
    monkeypatch.setattr(engine, "_logits", failing_model)
    monkeypatch.setattr(torch_engine, "device_computes", probe)

    with pytest.raises(EngineFailure, match="illegal memory access"):
        engine.submit(LONG_TEXTS[:1]).result(timeout=120)
    assert forward_calls == [1] and len(probes) == 1
    assert engine.is_healthy()  # the device still computes: a fault of that batch only
    monkeypatch.setattr(engine, "_logits", real_model)
    assert len(engine.submit(LONG_TEXTS[:2]).result(timeout=120)) == 2

    monkeypatch.setattr(engine, "_logits", failing_model)
    device["computes"] = False
    with pytest.raises(EngineFailure, match="illegal memory access"):
        engine.submit(LONG_TEXTS[:1]).result(timeout=120)
    assert forward_calls == [1, 1] and len(probes) == 2
    assert not engine.is_healthy()  # dead for good: server/dead_engine_exit.py ends the stub
    with pytest.raises(ServerUnavailable):
        engine.submit(LONG_TEXTS[:1]).result(timeout=0)
    assert forward_calls == [1, 1]  # refused, never computed


def test_a_forward_pass_longer_than_its_bound_kills_the_engine(engine_factory, monkeypatch):
    """A hang, not a slow pass: the stub blocks until released, so the bound is passed whatever the
    machine's speed; health turns false while it hangs and stays false after it returns."""
    engine = engine_factory(max_forward_pass_s=0.5)
    released, entered = threading.Event(), threading.Event()
    labels = len(engine.labels)

    def hung_model(batch):
        entered.set()
        released.wait()
        return torch.zeros((len(batch.documents), labels))

    monkeypatch.setattr(engine, "_logits", hung_model)
    hung = engine.submit(LONG_TEXTS[:1])
    assert entered.wait(120)
    wait_until(lambda: not engine.is_healthy(), "health false while a forward pass hangs past max_forward_pass_s")
    with pytest.raises(ServerUnavailable):
        engine.submit(LONG_TEXTS[:1]).result(timeout=0)
    # What server/dead_engine_exit.py then does: stop, which cannot wait for the hung pass, and
    # fails its request saying why.
    engine.stop(drain_timeout_s=1)
    with pytest.raises(ServerUnavailable, match="the engine died .*max_forward_pass_s=0.5"):
        hung.result(timeout=0)
    released.set()
    assert not engine.is_healthy()


def test_scores_that_overflowed_in_float16_fail_their_document_and_are_never_an_answer(engine_factory):
    """A real overflow: the demo model in float16 with its classifier head scaled past float16's
    range (65504) computes infinite logits, whose softmax is NaN."""
    engine = engine_factory(dtype="float16", packing="off")
    head = engine._model.score.weight
    with torch.no_grad():
        original = head.clone()
        head.mul_(1e5)
    with pytest.raises(EngineFailure, match="not finite"):
        engine.submit(LONG_TEXTS[:1]).result(timeout=120)
    assert engine.is_healthy()  # an input's overflow, not a dead device
    with torch.no_grad():
        head.copy_(original)
    (scores,) = engine.submit(LONG_TEXTS[:1]).result(timeout=120)
    assert np.isfinite(scores.probabilities).all()


def test_a_full_queue_refuses_before_tokenizing(engine_factory):
    """Admission counts a request at the most its documents can take before it is tokenized, so a
    refused request costs no tokenizing, however long its text."""
    engine = engine_factory(max_queue_tokens=4 * MAX_LENGTH, max_batch_tokens=MAX_LENGTH)
    encode, encoded = engine._encoder.encode, []

    def counted_encode(texts):
        encoded.append(len(texts))
        return encode(texts)

    engine._encoder.encode = counted_encode
    huge = "청구항 " * 60_000  # about 500 KB: hundreds of times max_length
    with held_engines():
        backlog = [engine.submit([text]) for text in LONG_TEXTS[:4]]
        assert encoded == [1] * 4
        with pytest.raises(Overloaded, match="max_queue_tokens=2048"):
            engine.submit([huge]).result(timeout=0)
        assert encoded == [1] * 4  # refused without tokenizing
    assert all(len(future.result(timeout=120)) == 1 for future in backlog)
    # With room, the same text is admitted at its real (truncated) count and answered.
    (scores,) = engine.submit([huge]).result(timeout=120)
    assert scores.truncated and scores.token_count == MAX_LENGTH
    assert engine.queue_depth() == (0, 0)
