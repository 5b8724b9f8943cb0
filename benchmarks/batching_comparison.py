"""Continuous token-budget batching vs Triton's dynamic batcher alone vs batch-1, in one run.

One real tritonserver serves the same merged model three times, differing only in
``batching`` (core/serving_config.py):

    continuous       the engine batches across requests by tokens, answers through response senders
    triton-batcher   Triton's dynamic batcher groups requests into one execute(), computed as one batch
    batch-1          one request per execute()

and the same closed-loop load (one patent per request, the way the office's backend sends
them; a realistic length mix) is sent to each in turn.

    .venv/bin/python -m benchmarks.batching_comparison [--merged-model DIR] [--requests 96] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.load_generator import closed_loop
from core.command_line import HelpFormatter
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports

MODES = {"continuous": "engine", "triton-batcher": "triton_dynamic", "batch-1": "none"}


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
        for name, batching in MODES.items():
            config = ServingConfig(
                model_dir=args.merged_model.resolve(), max_length=args.max_length,
                max_batch_tokens=args.max_batch_tokens, batching=batching,
                # Measured one at a time, so each has every core; `auto` would split them three ways.
                cpu_threads=len(os.sched_getaffinity(0)),
            )
            write_triton_model(Path(repository), name, config)
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
