"""Model FLOP utilisation: how much of the machine's measured matrix throughput a run turns into
classifications.

MFU = the FLOP/s of the classifications computed ÷ the FLOP/s of the best dense matmul this
device does *in the precision the model computes in*, measured in the same run: a bf16 model
against a bf16 matmul, a float32 model against a float32 one (``mfu`` refuses any other pairing),
so a number from one machine is not divided by another's datasheet, nor by the wrong precision's
ceiling (a bf16 model over a float32 ceiling reads several times too high on a CPU with bf16 units).

The ceiling is the best of torch's matmul and, on a CPU, oneDNN's matmul on weights packed in
its blocked layout (what vLLM's CPU backend and inductor use): on a CPU the two differ widely in
float32, and the ceiling is whichever is faster. For int8 it is ``torch._int_mm`` (int8 × int8 →
int32, the product ``core.quantized_linear.Int8Linear`` runs), for fp8 ``torch._scaled_mm`` with
row-wise scales (``Fp8Linear``'s): operations per second, counted as FLOPs are.

The FLOPs of one classification are what any implementation has to compute: 2 × the parameters
that multiply each token (every weight but the embedding table, which is a lookup), except that
the classifier reads one token, so the last layer's query side (query and output projections,
MLP) and the head are needed for that token only; the last layer's keys and values are still
needed for every token. Attention's own score and value products are left out (at 512 tokens
about 2 % for Gemma-2-9b): the MFU quoted errs low, never high.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Parameter names of the key and value projections (Llama/Gemma style, BERT style).
_KEY_VALUE_PROJECTIONS = ("k_proj", "v_proj", "key", "value")


@dataclass(frozen=True)
class MatmulCeiling:
    """The most FLOP/s a dense matmul reached on ``device`` in ``dtype``, and how."""

    device: str
    dtype: str
    tflops: float
    method: str  # "torch.matmul", "oneDNN packed", "torch._int_mm" or "torch._scaled_mm"
    shape: tuple[int, int, int]  # (rows, inner, columns) of the best measurement


@dataclass(frozen=True)
class ClassificationFlops:
    per_token: int  # every token of a document
    per_document: int  # once per document: the pooled token's last-layer query side and head

    def of(self, tokens: float, documents: float) -> float:
        return tokens * self.per_token + documents * self.per_document


def _seconds_per_call(call, repeats: int, synchronize) -> float:
    for _ in range(2):
        call()
    synchronize()
    best = float("inf")
    for _ in range(repeats):  # the best of several timings: a shared machine only ever slows one down
        started = time.perf_counter()
        call()
        synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_ceiling(device: str, dtype: str, shapes: list[tuple[int, int, int]] | None = None, repeats: int = 5) -> MatmulCeiling:
    """Measure the ceiling (see the module's docstring). ``shapes``: (rows, inner, columns); by
    default a square and a projection-like shape, scaled to the device."""
    on_gpu = torch.device(device).type == "cuda"
    shapes = shapes or ([(8192, 8192, 8192)] if on_gpu else [(1024, 1024, 1024), (2048, 1024, 4096)])

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    best = None
    for rows, inner, columns in shapes:
        if dtype in QUANTIZED_PRODUCTS:
            calls = {QUANTIZED_PRODUCTS[dtype][0]: QUANTIZED_PRODUCTS[dtype][1](rows, inner, columns, device)}
        else:
            calls = _float_products(rows, inner, columns, device, getattr(torch, dtype), on_gpu)
        for method, call in calls.items():
            tflops = 2 * rows * inner * columns / _seconds_per_call(call, repeats, synchronize) / 1e12
            if best is None or tflops > best.tflops:
                best = MatmulCeiling(str(device), dtype, tflops, method, (rows, inner, columns))
    return best


def _int8_product(rows: int, inner: int, columns: int, device: str):
    values = torch.randint(-127, 128, (rows, inner), dtype=torch.int8, device=device)
    weight = torch.randint(-127, 128, (columns, inner), dtype=torch.int8, device=device)
    return lambda: torch._int_mm(values, weight.t())


def _fp8_product(rows: int, inner: int, columns: int, device: str):
    from core.quantized_linear import FP8_DTYPE

    values = torch.randn(rows, inner, device=device).to(FP8_DTYPE)
    weight = torch.randn(columns, inner, device=device).to(FP8_DTYPE)
    row_scales, column_scales = torch.ones(rows, 1, device=device), torch.ones(1, columns, device=device)
    return lambda: torch._scaled_mm(values, weight.t(), scale_a=row_scales, scale_b=column_scales, out_dtype=torch.bfloat16)


QUANTIZED_PRODUCTS = {"int8": ("torch._int_mm", _int8_product), "fp8": ("torch._scaled_mm", _fp8_product)}


def _float_products(rows: int, inner: int, columns: int, device: str, torch_dtype: torch.dtype, on_gpu: bool) -> dict:
    activations = torch.randn(rows, inner, device=device, dtype=torch_dtype)
    weight = torch.randn(columns, inner, device=device, dtype=torch_dtype)
    calls = {"torch.matmul": lambda: activations @ weight.t()}
    if not on_gpu and torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        except RuntimeError:  # a oneDNN build or CPU without this dtype: torch's matmul alone
            packed = None
        if packed is not None:
            calls["oneDNN packed"] = lambda: torch.ops.mkldnn._linear_pointwise(activations, packed, None, "none", [], "")
    return calls


def _last_layer(model) -> torch.nn.Module | None:
    base = model.base_model
    layers = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None)
    return layers[-1] if layers is not None and len(layers) else None


def classification_flops(model_dir: Path) -> ClassificationFlops:
    """Counted on the meta device (nothing is allocated)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from core.quantized_linear import head_modules

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    once = set()
    last = _last_layer(model)
    if last is not None:
        once |= {id(p) for name, p in last.named_parameters() if not any(part in name.split(".") for part in _KEY_VALUE_PROJECTIONS)}
    for head in head_modules(model):  # decoders' head, encoders' head, BERT's pooler: all read the one pooled token
        once |= {id(p) for p in head.parameters()}
    counted = [p for p in model.parameters() if id(p) not in embeddings]
    return ClassificationFlops(
        per_token=2 * sum(p.numel() for p in counted if id(p) not in once),
        per_document=2 * sum(p.numel() for p in counted if id(p) in once),
    )


def mfu(tokens_per_second: float, documents_per_second: float, flops: ClassificationFlops,
        ceiling: MatmulCeiling, model_dtype: str) -> float:
    """Share of ``ceiling`` the classifications used; the ceiling must be measured in the model's dtype."""
    if model_dtype != ceiling.dtype:
        raise ValueError(
            f"MFU of a {model_dtype} model against a {ceiling.dtype} matmul would not be a share of anything: "
            f"measure the ceiling in {model_dtype}"
        )
    return flops.of(tokens_per_second, documents_per_second) / (ceiling.tflops * 1e12)
