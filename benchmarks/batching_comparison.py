"""Continuous token-budget batching vs Triton's dynamic batcher alone vs batch-1, in one run.

One real tritonserver serves the same merged model three times, with the same engine and
settings:

    continuous       the served model (server/triton/model.py): the engine batches across requests
                     by tokens and answers through response senders
    triton-batcher   benchmarks/baseline_triton_model.py under Triton's dynamic batcher: the
                     requests of one execute() computed as one batch
    batch-1          benchmarks/baseline_triton_model.py, one request per execute()

and the same closed-loop load (one patent per request, the way the office's backend sends
them; a realistic length mix) is sent to each in turn.

    .venv/bin/python -m benchmarks.batching_comparison [--merged-model DIR] [--requests 96] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.load_generator import closed_loop
from patent_classifier_client.command_line import HelpFormatter
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import MODEL_VERSION, write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports

BASELINE_MODEL_SOURCE = Path(__file__).resolve().parent / "baseline_triton_model.py"
# Configuration name → how Triton hands it requests: None for the served model itself, else the
# baseline model with Triton's dynamic batcher (True) or one request per execute() (False).
MODES = {"continuous": None, "triton-batcher": True, "batch-1": False}
# Requests arriving within this long are grouped by Triton's dynamic batcher into one execute().
DYNAMIC_BATCHER_DELAY_US = 2000


def write_compared_model(repository: Path, name: str, config: ServingConfig, triton_batches: bool | None) -> Path:
    """The export's Triton model folder; for a baseline, with the baseline's model.py and, under
    Triton's dynamic batcher, a batch dimension (``max_batch_size``) and the batcher itself."""
    folder = write_triton_model(repository, name, config)
    if triton_batches is None:
        return folder
    shutil.copyfile(BASELINE_MODEL_SOURCE, folder / MODEL_VERSION / "model.py")
    if triton_batches:
        pbtxt = folder / "config.pbtxt"
        unbatched = "max_batch_size: 0\n"
        text = pbtxt.read_text(encoding="utf-8")
        if unbatched not in text:
            raise ValueError(f"{pbtxt}: no {unbatched.strip()!r} line to give Triton's batch dimension")
        pbtxt.write_text(
            text.replace(unbatched, f"max_batch_size: {config.max_batch_size}\n")
            + f"dynamic_batching {{ max_queue_delay_microseconds: {DYNAMIC_BATCHER_DELAY_US} }}\n",
            encoding="utf-8",
        )
    return folder


def requests_per_execute(grpc_url: str, model: str) -> float:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(model).model_stats[0]
    return stats.inference_count / stats.execution_count if stats.execution_count else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching_comparison", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--merged-model", type=Path, default=Path("model_repository/kscst-gemma2/1/model"), help="the merged model folder (`make export`)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per document; longer patents are truncated")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=1024,
        help="engine token budget per forward pass (1024 suits a 2-core CPU; use 16384+ on a GPU)",
    )
    parser.add_argument("--requests", type=int, default=96, help="requests per configuration (one patent each)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop requests in flight")
    parser.add_argument("--long-share", type=float, default=0.7, help="share of patents past the token cap")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="time bound per configuration")
    parser.add_argument("--out", type=Path, default=Path("build/bench/batching_comparison.json"), help="JSON report")
    args = parser.parse_args(argv)
    if not (args.merged_model / "config.json").exists():
        parser.error(f"--merged-model {args.merged_model}: no merged model (run `make export`)")

    documents = synthetic_patents(args.requests, seed=2026, long_share=args.long_share)
    warmup = [[document] for document in synthetic_patents(8, seed=7)]
    with tempfile.TemporaryDirectory() as repository:
        config = ServingConfig(
            model_dir=args.merged_model.resolve(), max_length=args.max_length, max_batch_tokens=args.max_batch_tokens,
            # Measured one at a time, so each has every core; `auto` would split them three ways.
            cpu_threads=len(os.sched_getaffinity(0)),
        )
        for name, triton_batches in MODES.items():
            write_compared_model(Path(repository), name, config, triton_batches)
        http_port, grpc_port, metrics_port = free_loopback_ports(3)
        launch = LaunchConfig(model_repository=Path(repository), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
        with TritonServer(launch) as server:
            results = []
            for name in MODES:
                closed_loop("warm-up", server.grpc_url, name, warmup, concurrency=4)
                result = closed_loop(name, server.grpc_url, name, [[d] for d in documents], args.concurrency, max_seconds=args.max_seconds)
                row = result.summary()
                row["requests_per_execute"] = round(requests_per_execute(server.grpc_url, name), 2)
                results.append(row)
                print(json.dumps(row), flush=True)

    by_name = {row["label"]: row for row in results}
    continuous = by_name["continuous"]["samples_per_second"]
    report = {
        "taken": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "continuous_over_triton_batcher": round(continuous / by_name["triton-batcher"]["samples_per_second"], 2),
        "continuous_over_batch_1": round(continuous / by_name["batch-1"]["samples_per_second"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'configuration':<16}{'samples/s':>11}{'tokens/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'req/exec':>10}")
    for row in results:
        print(f"{row['label']:<16}{row['samples_per_second']:>11.2f}{row['tokens_per_second']:>11.0f}"
              f"{row['p50_ms']:>9.0f}{row['p99_ms']:>9.0f}{row['requests_per_execute']:>10.2f}")
    print(f"continuous / triton-batcher = {report['continuous_over_triton_batcher']}x, "
          f"continuous / batch-1 = {report['continuous_over_batch_1']}x  (written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
