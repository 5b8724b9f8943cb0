"""Samples/s of the vLLM engine against the PyTorch engine: the same documents, the same client
load, one tritonserver serving both models over the same merged folder.

    .venv/bin/python -m benchmarks.engine_comparison [--merged DIR] [--documents 192] [--concurrency 4]
        [--batch-size 8] [--rounds 3] [--time-limit 600]

Without --merged it builds the demo Gemma-2 and exports it into a temporary folder, as
`make export` does. It first times each engine's start in a fresh interpreter, as a Triton
model load pays it (importing the engine's stack, then loading the model and starting its
threads, or vLLM's processes), then starts one tritonserver with a model per engine, warms
both with one uncounted round, and sends the documents to one engine at a time, switching the
order each round so neither always runs first. Clients are the project's gRPC client, ``--concurrency`` threads
each sending requests of ``--batch-size`` documents. Everything stops at ``--time-limit``
seconds; a round cut short says so. Prints one JSON object. Environment variables reach the
engines (the launcher passes its environment to tritonserver): e.g.
VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets vLLM's CPU worker use every core instead of leaving one
to its front end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clients import PatentClassifier
from core.labels import LabelSet
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports

ENGINES = ("torch", "vllm")
MAX_LENGTH = 512


@dataclass
class EngineRound:
    engine: str
    round: int
    documents: int
    seconds: float
    samples_per_second: float
    request_p50_ms: float
    request_p95_ms: float
    cut_short: bool  # the time limit stopped it before every document was sent


def serving_config(engine: str, merged: Path, max_batch_tokens: int) -> ServingConfig:
    # The same limits for both engines; device/dtype as each engine resolves "auto" (CPU, float32 here).
    return ServingConfig(
        engine=engine, model_dir=merged, max_length=MAX_LENGTH, max_batch_tokens=max_batch_tokens,
        device="auto", vllm_kv_cache_mib=256,
    )


def measure_start(engine: str, merged: Path, max_batch_tokens: int) -> dict[str, float]:
    """In a fresh interpreter, as a Triton model load is: importing the engine's stack, then ``start()``."""
    from server.engines import build_engine

    started = time.monotonic()
    engine_object = build_engine(serving_config(engine, merged, max_batch_tokens))  # imports the engine's stack
    imported = time.monotonic()
    engine_object.start()
    ready = time.monotonic()
    engine_object.stop()
    return {"import_seconds": round(imported - started, 1), "start_seconds": round(ready - imported, 1)}


def fresh_process_start(engine: str, merged: Path, max_batch_tokens: int, timeout_s: float) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_comparison", "--measure-start", engine, "--merged", str(merged),
         "--max-batch-tokens", str(max_batch_tokens)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if result.returncode != 0:
        raise RuntimeError(f"starting the {engine} engine failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def drive(server: TritonServer, model: str, texts: list[str], concurrency: int, batch_size: int, deadline: float, round_index: int, engine: str):
    """Send every batch once, ``concurrency`` at a time; returns the round's figures and top-1 codes."""
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    latencies: list[float] = []
    top1: list[str | None] = [None] * len(texts)

    def worker(offset: int) -> None:
        with PatentClassifier(server.grpc_url, protocol="grpc", model=model, timeout_s=300) as client:
            for index in range(offset, len(batches), concurrency):
                if time.monotonic() > deadline:
                    return
                sent = time.monotonic()
                answers = client.classify_batch(batches[index], top_k=1)
                latencies.append(time.monotonic() - sent)
                for position, answer in enumerate(answers):
                    top1[index * batch_size + position] = answer.labels[0].code

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    seconds = time.monotonic() - started
    done = sum(code is not None for code in top1)
    milliseconds = np.array(latencies or [float("nan")]) * 1000
    figures = EngineRound(
        engine=engine, round=round_index, documents=done, seconds=round(seconds, 2),
        samples_per_second=round(done / seconds, 2), request_p50_ms=round(float(np.percentile(milliseconds, 50)), 1),
        request_p95_ms=round(float(np.percentile(milliseconds, 95)), 1), cut_short=done < len(texts),
    )
    return figures, top1


def export_demo(workdir: Path) -> Path:
    from export.demo_models import build_gemma2_demo
    from export.merged_model_export import merge_lora

    demo = build_gemma2_demo(workdir / "demo")
    merged = workdir / "merged"
    merge_lora(demo.base, demo.adapter, LabelSet.read_tsv(demo.labels), merged, max_length=MAX_LENGTH, proof_documents=4)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_comparison", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", type=Path, help="merged model folder (default: build and export the demo Gemma-2)")
    parser.add_argument("--documents", type=int, default=192)
    parser.add_argument("--long-share", type=float, default=0.7, help="share of documents that reach the 512-token cap")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="documents per request")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run, set-up included")
    parser.add_argument("--measure-start", choices=ENGINES, help=argparse.SUPPRESS)  # the child of fresh_process_start
    args = parser.parse_args(argv)
    if args.measure_start:
        print(json.dumps(measure_start(args.measure_start, args.merged, args.max_batch_tokens)))
        return 0
    deadline = time.monotonic() + args.time_limit

    with tempfile.TemporaryDirectory(prefix="engine-comparison-") as scratch:
        workdir = Path(scratch)
        merged = (args.merged or export_demo(workdir)).resolve()
        configs = {engine: serving_config(engine, merged, args.max_batch_tokens) for engine in ENGINES}
        start_seconds = {
            engine: fresh_process_start(engine, merged, args.max_batch_tokens, max(60.0, deadline - time.monotonic()))
            for engine in ENGINES
        }

        repository = workdir / "repository"
        for engine, config in configs.items():
            write_triton_model(repository, f"bench-{engine}", config)
        http_port, grpc_port, metrics_port = free_loopback_ports(3)
        launch = LaunchConfig(
            model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            backend_directory=workdir / "backends", ready_timeout_s=max(60.0, deadline - time.monotonic()),
        )
        texts = [document.render() for document in synthetic_patents(args.documents, seed=7, long_share=args.long_share)]
        rounds: list[EngineRound] = []
        last_top1: dict[str, list[str | None]] = {}
        with TritonServer(launch, log_path=workdir / "tritonserver.log") as server:
            for engine in ENGINES:  # warm-up, not counted: first passes of each batch shape pay for allocation
                drive(server, f"bench-{engine}", texts, args.concurrency, args.batch_size, deadline, 0, engine)
            for round_index in range(1, args.rounds + 1):
                order = ENGINES if round_index % 2 else ENGINES[::-1]
                for engine in order:
                    figures, last_top1[engine] = drive(
                        server, f"bench-{engine}", texts, args.concurrency, args.batch_size, deadline, round_index, engine
                    )
                    rounds.append(figures)
            server_ready_seconds = round(server.startup_seconds or float("nan"), 1)

    both = [i for i in range(len(texts)) if all(last_top1.get(engine, [None] * len(texts))[i] for engine in ENGINES)]
    agreement = sum(last_top1["torch"][i] == last_top1["vllm"][i] for i in both) / len(both) if both else float("nan")
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine_start_in_fresh_process": start_seconds,
        "tritonserver_ready_seconds_both_models": server_ready_seconds,
        "rounds": [asdict(figures) for figures in rounds],
        "top1_agreement_between_engines": agreement,
    }, indent=2))
    return 0


# vLLM starts its engine in spawned processes, which import this module again.
if __name__ == "__main__":
    sys.exit(main())
