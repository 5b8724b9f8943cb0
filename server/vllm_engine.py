"""The vLLM engine: vLLM's async engine (``AsyncLLM``) with its pooling runner, behind the same
contract as the PyTorch engine.

vLLM schedules and batches here; this class only adapts. Texts are tokenized with the same
``DocumentEncoder`` as the PyTorch engine and handed to vLLM as token ids, so both engines read
exactly the same tokens and report the same token counts and truncation. vLLM's asyncio API
runs on an event loop this engine owns, on a thread of its own (as Triton's vllm_backend does):
``submit`` schedules one coroutine per submission there and returns a
``concurrent.futures.Future`` at once, so callers on any thread can wait on it or attach a
callback. Each document is one vLLM request; vLLM's scheduler packs documents from different
submissions into its steps by its own token budget (``max_batch_tokens``).

vLLM runs the model in processes of its own (an engine core, and on the CPU a worker): in the
Triton Python backend they are started from the stub process, with the venv's interpreter.

Faults: a device fault kills vLLM's engine core (``errored``: the engine is dead, and
``server.dead_engine_exit`` ends the stub); an engine core that holds work and gives no output
for ``max_forward_pass_s`` is taken for hung, with the same outcome; scores that are not finite
(a float16 overflow) fail their request, never go out as an answer.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np
import torch
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.pooling_params import PoolingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from core.engine import ClassificationEngine, DocumentScores, QueueDepth, caller_gave_up, complete
from patent_classifier_client.errors import Cancelled, DeadlineExceeded, EngineFailure, Overloaded, ServerUnavailable, ServingError
from core.hf_classifier import DocumentEncoder, EncodedText, device_name, dtype_name, softmax
from core.served_precision import PrecisionReport, compute_dtype, served_precision
from core.serving_config import ServingConfig
from server.engine_hold import POLL_S as HOLD_POLL_S, EngineHold

log = logging.getLogger(__name__)

MIB = 1 << 20


# vLLM's online fp8 with the same scheme as our engine's (per-channel weights, per-token activations),
# never on the classifier head: quantized, a score head has given all-equal scores (vLLM #35849).
FP8_QUANTIZATION = dict(quantization="fp8_per_channel", quantization_config={"ignore": ["score", "classifier*", "*pooler*"]})


def engine_args(config: ServingConfig) -> AsyncEngineArgs:
    """The vLLM arguments a serving configuration means (also what `vllm serve` flags mirror)."""
    # What dtype means on vLLM's platform, through the export's agreement gate (core/served_precision.py).
    device = torch.device(current_platform.device_type)
    precision = served_precision(config.dtype, device, "vllm", PrecisionReport.read(config.model_dir))
    return AsyncEngineArgs(
        model=str(config.model_dir),
        runner="pooling",
        # We send token ids: vLLM never tokenizes, so it need not load a tokenizer.
        skip_tokenizer_init=True,
        dtype=compute_dtype(precision),
        **(FP8_QUANTIZATION if precision == "fp8" else {}),
        max_model_len=config.max_length,
        max_num_batched_tokens=config.max_batch_tokens,
        max_num_seqs=config.max_batch_size,
        # An explicit size: otherwise vLLM reserves a share (gpu_memory_utilization) of the whole
        # machine's memory, which on the CPU means host memory shared with everything else.
        kv_cache_memory_bytes=config.vllm_kv_cache_mib * MIB,
        enforce_eager=not config.vllm_compile,
        disable_log_stats=True,
    )


class VllmEngine(ClassificationEngine):
    def __init__(self, config: ServingConfig):
        super().__init__()
        self.config = config
        self.max_length = config.max_length
        self._loop = asyncio.new_event_loop()
        self._loop_thread: threading.Thread | None = None
        self._engine: AsyncLLM | None = None
        self._request_ids = itertools.count()
        self._in_flight: dict[asyncio.Task, Future] = {}  # touched only on the loop thread
        # vLLM queues whatever it is given; admission is bounded here instead, in tokens handed
        # to vLLM and not yet answered, so overload is refused at once as by the PyTorch engine.
        # The same count is the engine's queue depth: vLLM does not say which of the documents it
        # holds wait and which compute.
        self._admission = threading.RLock()  # reentrant: a future completed under it releases under it
        self._admitted_tokens = 0
        self._admitted_documents = 0
        # Not yet complete, wherever they are (what stop() fails last), and what each counts for.
        self._holding: dict[Future, QueueDepth] = {}
        self._hold = EngineHold.from_environment()
        # Documents vLLM holds and the last time one came back (or the first went in): a hang's measure.
        self._with_vllm = 0
        self._progress_at = time.monotonic()
        self._death: str | None = None  # why the engine can no longer answer; set once, never cleared

    def start(self) -> None:
        started = time.monotonic()
        self.labels = self.config.model_labels()
        self._encoder = DocumentEncoder(self.config.model_dir, self.max_length, self.config.preprocessing)
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._loop_thread.start()
        try:
            self._engine = asyncio.run_coroutine_threadsafe(self._create_engine(), self._loop).result()
            num_labels = self._engine.model_config.hf_config.num_labels
            if num_labels != len(self.labels):
                raise ValueError(
                    f"{self.config.model_dir}: the model has {num_labels} classes but {len(self.labels)} labels are listed"
                )
        except BaseException:
            self._shut_down()
            raise
        # What vLLM resolved, as it runs the model.
        self.device = device_name(torch.device(self._engine.vllm_config.device_config.device_type))
        self.dtype = "fp8" if self._engine.model_config.quantization else dtype_name(self._engine.model_config.dtype)
        self.startup_seconds = time.monotonic() - started
        log.info("vllm engine: %s on %s, %s, started in %.1f s", self.config.model_dir, self.device, self.dtype, self.startup_seconds)

    async def _create_engine(self) -> AsyncLLM:
        # Built on the loop it will serve: AsyncLLM starts its output handler on the running loop.
        return AsyncLLM.from_engine_args(engine_args(self.config))

    def submit(
        self,
        texts: Sequence[str],
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> "Future[list[DocumentScores]]":
        future = self._new_submission()
        if future.done():
            return future
        # Admitted at the most its documents can take, before tokenizing (as the PyTorch engine does),
        # then settled to its real tokens.
        admitted = self._admit(future, len(texts), min(len(texts) * self.max_length, self.config.max_queue_tokens))
        if admitted is None:
            return future
        try:
            encoded = self._encoder.encode(texts)
        except Exception as exc:
            complete(future, error=EngineFailure.internal(exc))  # gives its admission back
            raise
        if not self._settle(future, admitted, sum(len(item.token_ids) for item in encoded)):
            return future
        try:
            self._loop.call_soon_threadsafe(self._begin, future, encoded, deadline, is_cancelled)
        except RuntimeError:  # the loop closed after the health check above
            future.set_exception(ServerUnavailable("the engine is not running"))
        return future

    def _admit(self, future: Future, documents: int, tokens: int) -> QueueDepth | None:
        """Count a submission against max_queue_tokens, or refuse it; what it holds, to settle or release."""
        with self._admission:
            if self._admitted_tokens + tokens > self.config.max_queue_tokens:
                future.set_exception(Overloaded.queue_full(self._admitted_tokens, tokens, self.config.max_queue_tokens))
                return None
            self._admitted_tokens += tokens
            self._admitted_documents += documents
            self._holding[future] = held = QueueDepth(documents, tokens)
        future.add_done_callback(self._release)  # whatever the outcome
        return held

    def _settle(self, future: Future, reserved: QueueDepth, tokens: int) -> bool:
        """From the reservation to the submission's real tokens; False (refused) when they exceed it,
        which only a request larger than the whole queue does."""
        if tokens > reserved.tokens:
            complete(future, error=Overloaded.queue_full(self.queue_depth().tokens, tokens, self.config.max_queue_tokens))
            return False
        with self._admission:
            if future in self._holding:  # not yet released (a caller may cancel meanwhile)
                self._admitted_tokens += tokens - reserved.tokens
                self._holding[future] = QueueDepth(reserved.documents, tokens)
        return True

    def _release(self, future: Future) -> None:
        with self._admission:
            documents, tokens = self._holding.pop(future)
            self._admitted_tokens -= tokens
            self._admitted_documents -= documents

    def queue_depth(self) -> QueueDepth:
        """Admitted and not yet answered (what admission counts)."""
        with self._admission:
            return QueueDepth(self._admitted_documents, self._admitted_tokens)

    def is_healthy(self) -> bool:
        limit = self.config.max_forward_pass_s
        if self._death is None and self._with_vllm and limit and time.monotonic() - self._progress_at > limit:
            self._death = f"vLLM has held work without an output for more than max_forward_pass_s={limit:g} s"
            log.error("vllm engine dead: %s", self._death)
        return (
            self._loop_thread is not None
            and self._loop_thread.is_alive()
            and self._engine is not None
            and not self._engine.errored
            and self._death is None
        )

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        self._stopping = True
        if self._loop_thread is not None and self._loop_thread.is_alive():
            drained = asyncio.run_coroutine_threadsafe(self._drain(drain_timeout_s), self._loop)
            try:
                drained.result(drain_timeout_s + 10)
            except Exception:
                log.exception("draining the vllm engine failed")
        self._shut_down()
        with self._admission:
            unfinished = list(self._holding)
        for future in unfinished:  # never handed to vLLM (held, or the loop stopped first)
            complete(future, error=ServerUnavailable("the server shut down before this request ran"))

    def _shut_down(self) -> None:
        """Stop vLLM's processes, then the loop; safe to call twice."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
            # AsyncLLM shuts down again in __del__; let that happen now, while the modules it
            # calls still exist, not at interpreter exit ("'NoneType' object is not callable").
            gc.collect()
        if self._loop.is_closed():
            return
        if self._loop_thread is not None and self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(30)
        if not self._loop.is_running():
            self._loop.close()

    # Everything below runs on the loop thread.

    def _begin(
        self, future: Future, encoded: list[EncodedText], deadline: float | None, is_cancelled: Callable[[], bool] | None
    ) -> None:
        if future.done():  # cancelled while it waited for the loop
            return
        if self._hold.is_held() and not self._stopping:  # tests only: server/engine_hold.py
            self._loop.call_later(HOLD_POLL_S, self._begin, future, encoded, deadline, is_cancelled)
            return
        # vLLM schedules what it is given at once, so the caller's cancellation is asked here, once;
        # a cancel after this point reaches vLLM through future.cancel() (below).
        if caller_gave_up(future, is_cancelled):
            complete(future, error=Cancelled("the request was cancelled before it was computed"))
            return
        task = self._loop.create_task(self._classify(encoded, deadline))
        self._in_flight[task] = future
        task.add_done_callback(self._finish)
        # The caller may cancel from any thread; cancelling the task aborts its requests inside vLLM.
        future.add_done_callback(lambda done: done.cancelled() and self._cancel_threadsafe(task))

    def _cancel_threadsafe(self, task: asyncio.Task) -> None:
        try:
            self._loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:
            pass  # the loop is gone, and the task with it

    def _finish(self, task: asyncio.Task) -> None:
        future = self._in_flight.pop(task)
        if task.cancelled():
            outcome: BaseException | None = ServerUnavailable("the request was stopped before it finished")
        else:
            outcome = task.exception()
        # The caller may have cancelled it, or stop() failed it first: complete() settles the race.
        complete(future, task.result() if outcome is None else None, outcome)

    async def _classify(self, encoded: list[EncodedText], deadline: float | None) -> list[DocumentScores]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        documents = [asyncio.ensure_future(self._logits(item.token_ids)) for item in encoded]
        try:
            # wait_for, not asyncio.timeout: NVIDIA's Triton 24.10 container runs Python 3.10.
            rows = await asyncio.wait_for(asyncio.gather(*documents), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the deadline passed before {len(encoded)} documents were classified") from None
        except ServingError:
            raise
        except EngineDeadError as exc:
            raise EngineFailure(f"the vLLM engine died: {exc}") from exc
        except VLLMClientError as exc:  # vLLM refused a request we built: our bug, not the caller's
            raise EngineFailure(f"vLLM refused the request: {exc}") from exc
        except Exception as exc:
            log.exception("vllm classification of %d documents failed", len(encoded))
            raise EngineFailure(f"the model failed on this request: {type(exc).__name__}: {exc}") from exc
        finally:
            for document in documents:
                document.cancel()  # after a failure, abort the submission's other documents in vLLM
        logits = np.stack(rows)
        if not np.isfinite(logits).all():
            bad = [index for index, row in enumerate(logits) if not np.isfinite(row).all()]
            log.error("vLLM's scores for documents %s are not finite (%s)", bad, self.dtype)
            raise EngineFailure(f"the model's scores for documents {bad} are not finite (an overflow in {self.dtype}?)")
        # Softmax over raw logits here, in float32, as the PyTorch engine does: vLLM's own pooler
        # activation depends on the model config (sigmoid for one label, none for some heads).
        probabilities = softmax(logits)
        return [
            DocumentScores(row, len(item.token_ids), item.truncated) for row, item in zip(probabilities, encoded)
        ]

    async def _logits(self, token_ids: list[int]) -> np.ndarray:
        request_id = f"document-{next(self._request_ids)}"
        final = None
        if not self._with_vllm:
            self._progress_at = time.monotonic()  # idle until now: the wait for an output starts here
        self._with_vllm += 1
        try:
            async for output in self._engine.encode(
                tokens_input(token_ids), PoolingParams(task="classify", use_activation=False), request_id
            ):
                final = output
        finally:
            self._with_vllm -= 1
            self._progress_at = time.monotonic()
        if final is None or final.error is not None:
            reason = "no output" if final is None else f"{final.error.code}: {final.error.message}"
            raise EngineFailure(f"vLLM request {request_id} failed: {reason}")
        return final.outputs.data.float().cpu().numpy()

    async def _drain(self, timeout_s: float) -> None:
        if self._in_flight:
            await asyncio.wait(list(self._in_flight), timeout=timeout_s)
        for task, future in list(self._in_flight.items()):
            complete(future, error=ServerUnavailable("the server shut down before this request ran"))
            task.cancel()
