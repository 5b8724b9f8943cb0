"""Model FLOP utilisation: how much of the machine's measured matrix throughput a run turns into
classifications.

MFU = tokens/s × FLOP per token ÷ the FLOP/s of a plain bf16 (GPU) or float32 (CPU) matmul
measured in the same run, so a number from one machine is not divided by another's datasheet.
FLOP per token is 2 × the parameters that multiply each token (every weight but the embedding
table, which is a lookup). Attention's own score and value products are left out: at 512
tokens they add about 2 % for Gemma-2-9b, so the MFU quoted errs low.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch


def matmul_tflops(device: str, size: int | None = None, repeats: int = 20) -> float:
    """TFLOP/s of one square matmul, the best this device does on dense work."""
    on_gpu = torch.device(device).type == "cuda"
    size = size or (8192 if on_gpu else 1024)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(3):
        a @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def flop_per_token(model_dir: Path) -> int:
    """2 × non-embedding parameters, counted on the meta device (nothing is allocated)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    return 2 * sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def mfu(tokens_per_second: float, flop_per_token: int, tflops: float) -> float:
    return tokens_per_second * flop_per_token / (tflops * 1e12)
