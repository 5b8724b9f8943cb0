"""`make bench`: samples/s, tokens/s, latency and padding waste of our server against its peers
and against the 0.785 samples/s training baseline, on the same documents, in one run.

    .venv/bin/python -m benchmarks.bench [--model-dir DIR] [--configurations hf-single,hf-static,triton-torch,triton-vllm,vllm-serve]
        [--duration 8] [--concurrency 1,8] [--rates 4] [--long-share 0.7] [--out build/bench]
    .venv/bin/python -m benchmarks.bench --url HOST:8001 [--model kscst-gemma2] [--metrics-url http://HOST:8002/metrics]

Configurations are measured one after another, each started just before its turn and stopped
after it (servers on free loopback ports), so they never share the CPU or the GPU. Each gets
the same documents, generated Korean patents of which ``--long-share`` reach the
``--max-length`` cap (most real patents do) and the rest are short, one patent per request
(the way the office's backend sends them; hf-static takes ``--hf-batch-size`` per request), a
few uncounted warm-up requests, then a closed loop at each ``--concurrency`` and an open loop
(Poisson arrivals) at each of ``--rates`` requests/s, each bounded by ``--duration`` seconds
and ``--max-requests``. With ``--url`` only that server is measured.

A configuration may name its own precision after ``@`` (``triton-torch@int8``,
``triton-vllm@float32``); one without it computes in ``--dtype``. A configuration the hardware or
the export's agreement gate refuses (int8 on a CPU without VNNI, say) is reported as refused with
the reason, and the run goes on with the others.

Writes bench.json, bench.md and throughput_vs_p99.png into a new folder under ``--out``
(named by the time of the run) and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

from benchmarks import peers
from benchmarks.bench_report import Point, build_report, markdown, write_report
from benchmarks.load_generator import run_closed_loop, run_open_loop
from patent_classifier_client.command_line import HelpFormatter
from core.synthetic_patents import synthetic_patents

CONFIGURATIONS = ("hf-single", "hf-static", "triton-torch", "triton-vllm", "vllm-serve")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8")
WARM_UP_REQUESTS = 4


def csv_of(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]
    return parse


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("model_repository/kscst-gemma2/1/model"),
                        help="the merged model folder every local configuration loads (`make export` writes the demo's)")
    parser.add_argument("--configurations", type=csv_of(str), default=",".join(CONFIGURATIONS),
                        help=f"comma-separated, from {','.join(CONFIGURATIONS)}, each optionally @DTYPE (its own precision, "
                        "e.g. triton-torch@int8)")
    parser.add_argument("--url", help="benchmark our server already running there (HOST:PORT) instead of the configurations")
    parser.add_argument("--model", default="kscst-gemma2", help="with --url: the model name on that server")
    parser.add_argument("--metrics-url", help="with --url: its Triton metrics URL, for the PyTorch engine's padding waste")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="how the load reaches our server")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement point")
    parser.add_argument("--max-requests", type=int, default=100_000, help="requests per measurement point, at most")
    parser.add_argument("--concurrency", type=csv_of(int), default="1,8", help="closed-loop requests in flight, comma-separated")
    parser.add_argument("--rates", type=csv_of(float), default=[],
                        help="open-loop arrival rates in requests/s, comma-separated (not for hf-static, which has no "
                        "arrivals to batch; default: none, closed loop only)")
    parser.add_argument("--long-share", type=float, default=0.7, help="share of patents that reach the --max-length cap")
    parser.add_argument("--documents", type=int, default=256, help="distinct generated patents, sent in turn")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per document; longer patents are truncated")
    parser.add_argument("--max-batch-tokens", type=int, default=1024,
                        help="our engines' token budget per forward pass (1024 suits a 2-core CPU; 16384+ on a GPU)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="our engines' documents per forward pass, at most")
    parser.add_argument("--cpu-threads", default="auto",
                        help="the PyTorch engine's serving field cpu_threads: auto (its cores ÷ the server's CPU engines: all of "
                        "them here, where it is the only one) or a thread count")
    parser.add_argument("--prediction-records", choices=("off", "hash", "text"), default="off",
                        help="our engines' serving field prediction_records: the cost of recording every answer")
    parser.add_argument("--records-database", default=None,
                        help="with --prediction-records: the records database (default: a SQLite file in the run's scratch folder)")
    parser.add_argument("--hf-batch-size", type=int, default=8, help="hf-static: documents per static batch")
    parser.add_argument("--device", default="auto", help="transformers peers and the PyTorch engine: auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="the dtype of every configuration that names none: auto (as the engines resolve it: int8 on a "
                        "CPU with VNNI where the export accepted it, bf16 on a GPU or a CPU with native bf16, else float32), "
                        "float32, bfloat16, int8 (our PyTorch engine and transformers peers), fp8 (a GPU)")
    parser.add_argument("--vllm-kv-cache-mib", type=int, default=256, help="the vLLM engine's and `vllm serve`'s KV cache, in MiB")
    parser.add_argument("--p99-bound-ms", type=float, help="speedups compare the best samples/s with p99 under this")
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="a folder named by the run's time is made in it")
    parser.add_argument("--mfu", choices=("yes", "no"), default="yes",
                        help="model FLOP utilisation per point, against a matmul measured in this run in the configurations' "
                        "dtype (not with --url)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    unknown = {name for name in args.configurations if configuration_kind(name) not in CONFIGURATIONS}
    unknown |= {name for name in args.configurations if configuration_dtype(name, args.dtype) not in DTYPES}
    if unknown:
        parser.error(f"--configurations: unknown {sorted(unknown)}; choose from {','.join(CONFIGURATIONS)}, "
                     f"each optionally @ one of {','.join(DTYPES)}")
    if not args.url and not (args.model_dir / "config.json").exists():
        parser.error(f"--model-dir {args.model_dir}: no merged model there (run `make export`, or give --url)")
    if not 0.0 <= args.long_share <= 1.0:
        parser.error(f"--long-share: is {args.long_share}; must be between 0 and 1")
    return args


def configuration_kind(name: str) -> str:
    """``triton-torch@int8`` -> ``triton-torch``."""
    return name.partition("@")[0]


def configuration_dtype(name: str, default: str) -> str:
    """``triton-torch@int8`` -> ``int8``; ``triton-torch`` -> ``default``."""
    return name.partition("@")[2] or default


def start(name: str, args: argparse.Namespace, workdir: Path) -> AbstractContextManager[peers.Target]:
    model_dir = args.model_dir.resolve()
    kind, dtype = configuration_kind(name), configuration_dtype(name, args.dtype)
    if kind in ("hf-single", "hf-static"):
        batch_size = 1 if kind == "hf-single" else args.hf_batch_size
        return peers.transformers_target(name, model_dir, args.max_length, batch_size, args.device,
                                         served_dtype(args.device, dtype, "transformers", model_dir))
    if kind in ("triton-torch", "triton-vllm"):
        engine = kind.removeprefix("triton-")
        records_database = None
        if args.prediction_records != "off":
            records_database = args.records_database or f"sqlite:///{workdir / 'prediction-records.db'}"
        config = peers.serving_config(engine, model_dir, args.max_length, args.max_batch_tokens, args.max_batch_size,
                                      args.vllm_kv_cache_mib, args.device, dtype, args.cpu_threads,
                                      args.prediction_records, records_database)
        return peers.triton_target(name, config, args.protocol, workdir)
    return peers.vllm_serve_target(name, model_dir, args.max_length, args.vllm_kv_cache_mib,
                                   served_dtype(args.device, dtype, "vllm", model_dir), workdir)


async def measure(target: peers.Target, documents: list, args: argparse.Namespace) -> list[Point]:
    per_request = target.documents_per_request
    requests = [documents[i : i + per_request] for i in range(0, len(documents) - per_request + 1, per_request)]
    progress = not args.no_progress
    points = []
    async with target.sender() as send:
        # Documents answered so far: each reading of the target's counts waits until it holds them
        # (a server's metrics are applied behind its answers).
        start = target.computed_tokens()
        answered = 0 if start is None else start.documents
        warm_up = await run_closed_loop("warm-up", send, requests, concurrency=2, max_seconds=120, max_requests=WARM_UP_REQUESTS)
        answered += warm_up.documents
        loads = [("closed", c) for c in args.concurrency]
        if per_request == 1:
            loads += [("open", rate) for rate in args.rates]
        for mode, value in loads:
            before = target.computed_tokens(answered)
            label = f"{target.name} {mode} {value:g}"
            if mode == "closed":
                result = await run_closed_loop(label, send, requests, value, args.duration, args.max_requests, progress)
            else:
                result = await run_open_loop(label, send, requests, value, args.duration, args.max_requests,
                                             drain_seconds=max(30.0, args.duration), progress=progress)
            answered += result.documents
            after = target.computed_tokens(answered)
            waste = None if before is None or after is None else after.since(before).padding_waste
            point = Point(target.name, result, waste)
            points.append(point)
            row = point.row()
            print(f"{target.name:<13} {point.load:<20} {row['samples_per_second']:>9.2f} samples/s  "
                  f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  failures {row['failures']}", file=sys.stderr, flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    load_at_start = os.getloadavg()[0]  # others' work on the same cores moves every figure: say how busy it was
    documents = synthetic_patents(args.documents, seed=2026, long_share=args.long_share)
    folder = args.out / time.strftime("%Y%m%d-%H%M%S")
    from core.quantized_linear import PrecisionUnavailable
    from core.served_precision import PrecisionRefused

    points: list[Point] = []
    startup: dict[str, float | None] = {}
    dtypes: dict[str, str] = {}
    refused: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        if args.url:
            target = peers.ServerTarget(f"server at {args.url}", None, 1, args.url, args.protocol, args.model, args.metrics_url)
            startup[target.name] = None
            points += asyncio.run(measure(target, documents, args))
        for name in [] if args.url else args.configurations:
            try:
                dtypes[name] = served_dtype(args.device, configuration_dtype(name, args.dtype), ENGINES[configuration_kind(name)],
                                            args.model_dir)
            except (PrecisionRefused, PrecisionUnavailable) as refusal:  # this machine or the gate: say why, go on
                refused[name] = str(refusal)
                print(f"{name} refused: {refusal}", file=sys.stderr, flush=True)
                continue
            print(f"starting {name} ({dtypes[name]}) …", file=sys.stderr, flush=True)
            with start(name, args, Path(scratch)) as target:
                startup[name] = target.startup_seconds
                points += asyncio.run(measure(target, documents, args))
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
               "gpu": _gpu_name(), "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]}}
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    report = build_report(points, startup, args.p99_bound_ms, machine, settings)
    if not args.url:
        report["dtypes"], report["refused"] = dtypes, refused
    if _wants_mfu(args):
        add_mfu(report, args.model_dir, args.device)
    report["taken"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    paths = write_report(report, folder)
    print(markdown(report))
    print("written: " + ", ".join(str(path) for path in paths.values()))
    return 0


def _wants_mfu(args: argparse.Namespace) -> bool:
    # Only for the configurations run here: a server elsewhere may compute in another precision.
    return not args.url and args.mfu != "no"


# Whose rules resolve a configuration's dtype: our engines' (core/served_precision.py); the transformers
# peers and `vllm serve` follow the PyTorch engine's and the vLLM engine's.
ENGINES = {"hf-single": "transformers", "hf-static": "transformers", "triton-torch": "torch", "triton-vllm": "vllm",
           "vllm-serve": "vllm"}


def served_dtype(device: str, dtype: str, engine: str = "torch", model_dir: Path | None = None) -> str:
    """What a configuration computes in: ``dtype``, with ``auto`` resolved as the engines resolve it on
    this machine, through the model's agreement report (int8 on a CPU with VNNI where the export
    accepted it, bf16 on a GPU or a CPU with native bf16, else float32). Raises the engines' own
    refusal where this machine or the gate refuses it."""
    from core.hf_classifier import resolve_device
    from core.served_precision import PrecisionReport, served_precision

    report = PrecisionReport.read(model_dir) if model_dir is not None else None
    # The transformers peers have no agreement gate of their own: they compute what they are asked.
    if engine == "transformers" and dtype != "auto":
        return dtype
    return served_precision(dtype, resolve_device(device), "vllm" if engine == "vllm" else "torch", report)


def add_mfu(report: dict, model_dir: Path, device: str) -> None:
    """After the loads, so the matmul competes with nothing: each configuration's MFU against a matmul
    measured in this run in the precision it computed in."""
    from benchmarks.model_flops import classification_flops, matmul_ceiling, mfu
    from core.hf_classifier import resolve_device

    flops = classification_flops(model_dir)
    ceilings = {dtype: matmul_ceiling(str(resolve_device(device)), dtype) for dtype in sorted(set(report["dtypes"].values()))}
    report["mfu"] = {"flop_per_token": flops.per_token, "flop_per_document": flops.per_document, "ceilings": {
        dtype: {"matmul_tflops": round(c.tflops, 3), "matmul_method": c.method, "matmul_shape": list(c.shape)}
        for dtype, c in ceilings.items()}}
    for row in report["points"] + list(report["best"].values()):
        dtype = report["dtypes"][row["configuration"]]
        row["mfu"] = round(mfu(row["tokens_per_second"], row["samples_per_second"], flops, ceilings[dtype], dtype), 4)


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# vLLM starts its engine in spawned processes, which import this module again.
if __name__ == "__main__":
    sys.exit(main())
