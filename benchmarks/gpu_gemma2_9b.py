"""The real Gemma-2-9b classifier architecture on one GPU: the ceiling and the engine alone.

Speed does not depend on weight values, so the model is Gemma-2-9b's published configuration
with random bf16 weights (188 KSCST classes), written once to ``--model-dir`` and reused by
later runs and by the server benchmark. In one run it measures:

  1. a matmul's TFLOP/s on this GPU in --dtype (what MFU is measured against: benchmarks/model_flops.py);
  2. attention parity: fp32 eager (softcap applied) against the serving path (bf16,
     ``causal_flex``) and against bf16 eager (the bf16 rounding floor), top-1 agreement and
     max |Δprob| on the same patents;
  3. the PyTorch engine alone, in process: samples/s, tokens/s, MFU, padding waste and p50/p99
     of each document's latency, with every patent at 512 tokens and on a realistic mix.

Through the real tritonserver, and against the transformers peers, ``benchmarks.bench`` then
measures the same folder (it reports MFU too when it runs on a GPU). ``benchmarks/gpu_session.sh``
runs both on the lent GPU machine (benchmarks/GPU.md).

    python -m benchmarks.gpu_gemma2_9b --model-dir build/gemma2-9b-random [--documents 512] [--skip-parity]
    python -m benchmarks.gpu_gemma2_9b --model-dir DIR --write-only
    python -m benchmarks.gpu_gemma2_9b --architecture tiny --device cpu --dtype float32 ...   # rehearsal; the suite runs it
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_report import TRAINING_BASELINE_SAMPLES_PER_SECOND
from benchmarks.model_flops import classification_flops, matmul_ceiling, mfu
from benchmarks.peers import GPU_PAD_TO_MULTIPLE_OF
from patent_classifier_client.command_line import HelpFormatter
from core.quantized_linear import PrecisionUnavailable, check_hardware
from core.served_precision import QUANTIZED, PrecisionRefused

TOKENIZER_SPECIALS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # the demo tokenizer's ids

# google/gemma-2-9b's config.json, as published.
GEMMA2_9B = dict(
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=8192,
    hidden_activation="gelu_pytorch_tanh",
    **TOKENIZER_SPECIALS,
)
# The same architecture at a size a CPU runs in seconds, so the suite can run this whole script.
TINY = {**GEMMA2_9B, "vocab_size": 8000, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32}
ARCHITECTURES = {"gemma-2-9b": GEMMA2_9B, "tiny": TINY}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_random_model(out_dir: Path, architecture: str, device: str) -> Path:
    """Random bf16 weights of ``architecture`` with the demo tokenizer and the KSCST labels.

    A folder already holding this architecture is reused: writing 18 GB costs the lent GPU's
    minutes, and speed does not depend on which random weights they are."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    from core.labels import LABELS_FILENAME, LabelSet
    from export.demo_models import KSCST_LABELS_FILE, train_patent_tokenizer

    shape = ARCHITECTURES[architecture]
    config_file = out_dir / "config.json"
    if config_file.exists():
        saved = json.loads(config_file.read_text())
        if all(saved.get(key) == value for key, value in shape.items()):
            log(f"reusing the random {architecture} classifier in {out_dir}")
            return out_dir
    labels = LabelSet.read_tsv(KSCST_LABELS_FILE)
    config = Gemma2Config(**shape, num_labels=len(labels), id2label=labels.id2label(),
                          label2id={c: i for i, c in labels.id2label().items()})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: a float32 9B model would need 37 GB first
    try:
        with torch.device(device):
            model = Gemma2ForSequenceClassification(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer = train_patent_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == tuple(TOKENIZER_SPECIALS.values())
    tokenizer.save_pretrained(out_dir)
    labels.write_tsv(out_dir / LABELS_FILENAME)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    log(f"random {architecture} classifier written to {out_dir}")
    return out_dir


def measure_the_gate(model_dir: Path, args: argparse.Namespace) -> dict:
    """What the export does before a quantized precision may be served: float32 and --dtype on the
    same patents, the report written beside the weights (core/served_precision.py) for the engine to read."""
    from core.serving_config import ServingConfig
    from core.served_precision import PrecisionReport
    from export.merged_model_export import proof_texts
    from export.precision_agreement import compare_precisions, measure

    serving = ServingConfig(model_dir=model_dir, max_length=512, dtype="auto", device=args.device)
    texts = proof_texts(args.agreement_documents)
    logits = compare_precisions(model_dir, serving, texts, args.device, [args.dtype], proof_memory_gib=1e6)
    measured = measure(args.dtype, logits["float32"], logits[args.dtype], [], [], args.min_top1_agreement)
    PrecisionReport("float32", args.device, len(texts), 0, None, args.min_top1_agreement, (measured,), args.dtype).write(model_dir)
    return {"documents": len(texts), "min_top1_agreement": args.min_top1_agreement, "top1_agreement": measured.top1_agreement,
            "max_abs_probability_diff": measured.max_abs_probability_diff, "accepted": measured.accepted}


def engine_throughput(model_dir: Path, workloads: dict[str, list[str]], args: argparse.Namespace) -> dict[str, dict]:
    """Each workload's documents submitted at once, one per request, as a busy office backend
    would, through one engine (loaded and compiled once)."""
    from core.serving_config import ServingConfig
    from server.torch_engine import TorchEngine

    on_gpu = torch.device(args.device).type == "cuda"
    longest = max(len(texts) for texts in workloads.values())
    engine = TorchEngine(ServingConfig(model_dir=model_dir, max_length=512, max_batch_tokens=args.max_batch_tokens,
                                       max_batch_size=args.max_batch_size, max_queue_tokens=max(longest * 512, 512),
                                       device=args.device, dtype=args.dtype, attention=args.attention,
                                       pad_to_multiple_of=GPU_PAD_TO_MULTIPLE_OF if on_gpu else 1))
    started_loading = time.perf_counter()
    engine.start()  # loads, and compiles the attention for every batch shape (engine warm-up)
    log(f"engine loaded and warmed up in {time.perf_counter() - started_loading:.1f} s")
    batches = []
    engine.observe_batches(batches.append)
    rows = {}
    try:
        for name, texts in workloads.items():
            engine.submit(texts[:8]).result()
            batches.clear()
            started = time.perf_counter()
            futures = [(engine.submit([text]), time.perf_counter()) for text in texts]
            latencies, tokens = [], 0
            for future, submitted in futures:
                (scores,) = future.result()
                latencies.append(time.perf_counter() - submitted)  # upper bound: read in submission order
                tokens += scores.token_count
            seconds = time.perf_counter() - started
            padded = sum(b.padded_tokens for b in batches)
            real = sum(b.real_tokens for b in batches)
            rows[name] = {"documents": len(texts), "seconds": round(seconds, 3),
                          "samples_per_second": round(len(texts) / seconds, 2), "tokens_per_second": round(tokens / seconds),
                          "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
                          "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
                          "batches": len(batches), "padding_waste": round(1 - real / padded, 4) if padded else 0.0}
            log(f"{name}: {json.dumps(rows[name])}")
    finally:
        engine.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_gemma2_9b", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("build/gemma2-9b-random"),
                        help="where the random classifier is written, or reused if already there")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="gemma-2-9b", help="gemma-2-9b, or tiny to rehearse on a CPU")
    parser.add_argument("--write-only", action="store_true", help="write the model folder and stop")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to rehearse")
    parser.add_argument("--dtype", default="bfloat16",
                        help="the engine's and the parity candidates' dtype; fp8 (or int8 on a CPU): measured against float32 "
                        "first, as the export's gate does, and served only if that agreement reaches --min-top1-agreement")
    parser.add_argument("--min-top1-agreement", type=float, default=0.99,
                        help="with a quantized --dtype: the gate's threshold. These weights are random, so their classes are "
                        "near-tied and speed does not depend on them: a speed run may pass 0, and the report records it")
    parser.add_argument("--agreement-documents", type=int, default=32, help="with a quantized --dtype: patents the gate measures")
    parser.add_argument("--attention", default="auto", help="the engine's attention (auto: causal_flex on a GPU)")
    parser.add_argument("--documents", type=int, default=512, help="patents per workload")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="the engine's padded tokens per forward pass")
    parser.add_argument("--max-batch-size", type=int, default=64, help="the engine's documents per forward pass")
    parser.add_argument("--skip-parity", action="store_true", help="skip the attention parity step")
    parser.add_argument("--parity-candidates", default="causal_flex,eager",
                        help="attentions compared with fp32 eager, in --dtype")
    parser.add_argument("--out", type=Path, default=Path("build/bench/gpu_gemma2_9b.json"), help="JSON report")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (run it on the lent GPU machine, or rehearse with --device cpu)")
    model_dir = build_random_model(args.model_dir, args.architecture, args.device)
    if args.write_only:
        return 0

    from benchmarks.attention_parity import compare
    from core.synthetic_patents import synthetic_patents

    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "architecture": args.architecture, "dtype": args.dtype,
                    "baseline_samples_per_second": TRAINING_BASELINE_SAMPLES_PER_SECOND}
    ceiling = matmul_ceiling(args.device, args.dtype)
    flops = classification_flops(model_dir)
    report["matmul_tflops"] = round(ceiling.tflops, 2)
    report["flop_per_token"], report["flop_per_document"] = flops.per_token, flops.per_document
    log(f"{args.dtype} matmul {report['matmul_tflops']} TFLOP/s ({ceiling.method}); the model costs "
        f"{flops.per_token / 1e9:.2f} GFLOP per token and {flops.per_document / 1e9:.2f} per document")
    if args.dtype in QUANTIZED:
        report["agreement"] = measure_the_gate(model_dir, args)
        log(f"agreement with float32: {json.dumps(report['agreement'])}")
    if not args.skip_parity and args.dtype not in QUANTIZED:  # attention parity is a float dtype's question
        candidates = [(name, args.dtype) for name in args.parity_candidates.split(",")]
        report["attention_parity"] = compare(model_dir, candidates, args.device, 8, 512)
        log(f"attention parity: {json.dumps(report['attention_parity'])}")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    workloads = {
        "engine_512_tokens": [d.render() for d in synthetic_patents(args.documents, seed=1, long_share=1.0)],
        "engine_realistic_mix": [d.render() for d in synthetic_patents(args.documents, seed=2, long_share=0.7)],
    }
    try:
        if args.dtype in QUANTIZED:
            check_hardware(args.dtype, torch.device(args.device))
        rows = engine_throughput(model_dir, workloads, args)
    except (PrecisionRefused, PrecisionUnavailable) as refusal:  # the gate, or hardware without fp8: said, not hidden
        report["engine_refused"] = str(refusal)
        log(f"engine refused: {refusal}")
        rows = {}
    for name, row in rows.items():
        row["mfu"] = round(mfu(row["tokens_per_second"], row["samples_per_second"], flops, ceiling, args.dtype), 3)
        row["speedup_over_baseline"] = round(row["samples_per_second"] / TRAINING_BASELINE_SAMPLES_PER_SECOND, 1)
        report[name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
