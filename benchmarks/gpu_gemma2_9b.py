"""The real Gemma-2-9b classifier architecture on one GPU: the ceiling and the engine alone.

Speed does not depend on weight values, so the model is Gemma-2-9b's published configuration
with random bf16 weights (188 KSCST classes). In one run it measures:

  1. a bf16 matmul's TFLOP/s on this GPU (the ceiling MFU is measured against);
  2. attention parity: fp32 eager (softcap applied) vs the serving path (bf16, FlexAttention),
     top-1 agreement and max |Δprob| on the same patents;
  3. the PyTorch engine alone: samples/s, tokens/s and MFU at 512 tokens, and on a realistic mix.

Through the real tritonserver, and against the peers, the same model is measured by the
benchmark harness (``benchmarks.bench``) on the folder ``--write-model`` leaves behind:

    python -m benchmarks.gpu_gemma2_9b [--documents 512] [--skip-parity]
    python -m benchmarks.gpu_gemma2_9b --write-model build/gemma2-9b-random    # then benchmarks.bench on it

README "GPU recipe" has the whole sequence for the lent GPU machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

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
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def matmul_tflops(size: int = 8192, repeats: int = 50) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def build_random_model(out_dir: Path) -> tuple[Path, int]:
    """Save Gemma-2-9b-shaped random bf16 weights with the demo tokenizer and KSCST labels."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    from core.labels import LABELS_FILENAME, LabelSet
    from export.demo_models import KSCST_LABELS_FILE, train_patent_tokenizer

    labels = LabelSet.read_tsv(KSCST_LABELS_FILE)
    config = Gemma2Config(**GEMMA2_9B, num_labels=len(labels), id2label=labels.id2label(),
                          label2id={c: i for i, c in labels.id2label().items()})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Gemma2ForSequenceClassification(config)
    torch.set_default_dtype(torch.float32)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    model.save_pretrained(out_dir)
    train_patent_tokenizer().save_pretrained(out_dir)
    labels.write_tsv(out_dir / LABELS_FILENAME)
    del model
    torch.cuda.empty_cache()
    return out_dir, non_embedding


def engine_throughput(model_dir: Path, texts: list[str], max_batch_tokens: int) -> dict:
    from core.serving_config import ServingConfig
    from server.torch_engine import TorchEngine

    engine = TorchEngine(ServingConfig(model_dir=model_dir, max_length=512, max_batch_tokens=max_batch_tokens,
                                       max_batch_size=256, device="cuda", dtype="bfloat16",
                                       pad_to_multiple_of=64))
    engine.start()
    batches = []
    engine.observe_batches(batches.append)
    try:
        engine.submit(texts[:64]).result()  # compile and warm every shape bucket we are about to use
        batches.clear()
        started = time.perf_counter()
        futures = [engine.submit([text]) for text in texts]
        scores = [future.result()[0] for future in futures]
        seconds = time.perf_counter() - started
    finally:
        engine.stop()
    padded = sum(b.padded_tokens for b in batches)
    real = sum(b.real_tokens for b in batches)
    return {"documents": len(scores), "seconds": round(seconds, 3), "samples_per_second": round(len(scores) / seconds, 2),
            "tokens_per_second": round(sum(s.token_count for s in scores) / seconds), "batches": len(batches),
            "padding_waste": round(1 - real / padded, 4) if padded else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--write-model", type=Path, help="only save the random Gemma-2-9b classifier there, for benchmarks.bench")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("build/bench/gpu_gemma2_9b.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (run it on the lent GPU machine)")
    if args.write_model:
        _, non_embedding = build_random_model(args.write_model)
        print(f"random Gemma-2-9b classifier ({non_embedding / 1e9:.2f} B non-embedding parameters) in {args.write_model}")
        return 0

    from benchmarks.attention_parity import compare
    from core.synthetic_patents import synthetic_patents

    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["matmul_tflops"] = round(matmul_tflops(), 1)
    print(json.dumps(report), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="gemma2-9b-"))
    try:
        model_dir, non_embedding = build_random_model(scratch / "model")
        flop_per_token = 2 * non_embedding
        if not args.skip_parity:
            report["attention_parity"] = compare(model_dir, [("flex_attention", "bfloat16"), ("sdpa", "bfloat16")], "cuda", 8, 512)
            print(json.dumps(report["attention_parity"]), flush=True)
        full = [d.render() for d in synthetic_patents(args.documents, seed=1, long_share=1.0)]
        mix = [d.render() for d in synthetic_patents(args.documents, seed=2, long_share=0.7)]
        for name, texts in (("engine_512_tokens", full), ("engine_realistic_mix", mix)):
            row = engine_throughput(model_dir, texts, args.max_batch_tokens)
            row["mfu"] = round(row["tokens_per_second"] * flop_per_token / (report["matmul_tflops"] * 1e12), 3)
            report[name] = row
            print(json.dumps({name: row}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["baseline_samples_per_second"] = 0.785
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
