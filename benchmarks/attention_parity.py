"""Is the fast attention exact? fp32 eager (the reference: softcap applied) against the
implementations a server could run, on the same patents: top-1 agreement and max |Δprob|.

    .venv/bin/python -m benchmarks.attention_parity --model-dir MERGED_DIR [--device cuda --dtype bfloat16]
    .venv/bin/python -m benchmarks.attention_parity --softcap-demo     # CPU: a model whose softcap bites

With ``--softcap-demo`` the tiny demo Gemma-2 gets query/key weights scaled up so that raw
attention logits exceed the 50.0 cap, as they do in trained Gemma-2 models; that is where
SDPA (which drops the cap) parts from eager and where a correct fast path must not.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core import causal_flex_attention
from patent_classifier_client.command_line import HelpFormatter
from core.hf_classifier import DTYPES, encode_texts, load_sequence_classifier, load_tokenizer, pad_batch
from core.synthetic_patents import synthetic_patents


@torch.inference_mode()
def _probabilities(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[np.ndarray, float]:
    model(input_ids=input_ids, attention_mask=attention_mask)  # warm-up (FlexAttention compiles here)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    probabilities = torch.softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), dim=-1)
    return probabilities.cpu().numpy(), time.perf_counter() - started


def compare(model_dir: Path, candidates: list[tuple[str, str]], device: str, documents: int, max_length: int) -> list[dict]:
    """One load: the float32 eager reference first, then the same model object switched to each
    candidate's attention and cast down to its dtype (float32 candidates before 16-bit ones), so
    a 9B model is read from disk once and one float32 copy is the most the device must hold."""
    texts = [d.render() for d in synthetic_patents(documents, seed=31, long_share=0.7)]
    encoded = encode_texts(load_tokenizer(model_dir), texts, max_length)
    model = load_sequence_classifier(model_dir, torch.float32, device, "eager")
    batch = pad_batch([e.token_ids for e in encoded], model.config.pad_token_id, torch.device(device))
    reference, reference_seconds = _probabilities(model, *batch)
    rows = [{"attention": "eager", "dtype": "float32", "seconds": round(reference_seconds, 4), "top1_agreement": 1.0, "max_abs_prob_diff": 0.0}]
    for attention, dtype in sorted(candidates, key=lambda candidate: candidate[1] != "float32"):
        if attention == causal_flex_attention.NAME:
            causal_flex_attention.register()
        model.set_attn_implementation(attention)
        candidate, seconds = _probabilities(model.to(DTYPES[dtype]), *batch)
        rows.append({
            "attention": attention,
            "dtype": dtype,
            "seconds": round(seconds, 4),
            "top1_agreement": float((candidate.argmax(-1) == reference.argmax(-1)).mean()),
            "max_abs_prob_diff": float(np.abs(candidate - reference).max()),
        })
    return rows


def softcap_demo_model(out_dir: Path) -> Path:
    from export.demo_models import build_gemma2_demo
    from transformers import Gemma2ForSequenceClassification

    paths = build_gemma2_demo(out_dir)
    model = Gemma2ForSequenceClassification.from_pretrained(paths.base, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            # Raw q·k/√d grows with the square of this factor: ~0.05 → well past the 50.0 cap.
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    model.save_pretrained(out_dir / "softcapped")
    load_tokenizer(paths.base).save_pretrained(out_dir / "softcapped")
    return out_dir / "softcapped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_parity", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a merged Gemma-2 classifier folder (or give --softcap-demo)")
    parser.add_argument("--softcap-demo", action="store_true", help="the tiny demo Gemma-2, scaled so that its softcap bites")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="dtype of the fast candidates")
    parser.add_argument("--candidates", default="sdpa,flex_attention,causal_flex", help="attentions compared with fp32 eager, comma-separated")
    parser.add_argument("--documents", type=int, default=8, help="generated patents")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per document")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = softcap_demo_model(Path(scratch)) if args.softcap_demo else args.model_dir
        if model_dir is None:
            parser.error("give --model-dir or --softcap-demo")
        candidates = [(name, args.dtype) for name in args.candidates.split(",")]
        for row in compare(model_dir, candidates, args.device, args.documents, args.max_length):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
