"""Linear layers computed in 8 bits: int8 on CPUs with VNNI, fp8 on GPUs with fp8 tensor cores.

Both quantize the same way, the scheme vLLM calls W8A8 with per-channel weights and dynamic
per-token activations:

- each weight row (one output channel) gets its own scale, ``max |row| / Q``, fixed at load;
- each activation row (one token) gets its own scale, computed on every forward pass from that
  row alone, so a document's answer never depends on the documents it shares a batch with;
- the product of the 8-bit values is accumulated in 32 bits (int8: exactly; fp8: in float32 by the
  tensor cores), then multiplied by the token's scale and the channel's scale, in float32.

``Q`` is 127 for int8 (symmetric, so the 8-bit values are in [-127, 127] and every product fits a
16-bit lane the kernels never saturate) and 448 for fp8 e4m3. Only ``nn.Linear`` layers are
quantized, and never the classifier head (``quantize_linears``' ``keep``): the head turns a few
hundred features into the class scores the answer is read from, costs nothing next to the
layers, and quantizing it has given all-equal scores elsewhere (vLLM #35849).

int8 on the CPU runs ``torch._int_mm``: its result is the exact integer product on every CPU by
contract, and with AVX-512 VNNI (or AMX) torch hands it to oneDNN's VNNI kernels. oneDNN's own
``qlinear_pointwise`` (u8 × s8) is as fast there but takes one scale for every row, and without
VNNI it adds pairs of u8 × s8 products in 16-bit lanes that saturate: on an AVX2 CPU its integers
were off by up to 332,215 at 512 × 3584 × 14336 (benchmarks/results/2026-12-06-int8.md). Where torch
has no VNNI kernel, ``_int_mm`` falls back to a loop about 25× slower than float32: the engine refuses int8 there
(``cpu_has_int8_dot_product``), and the export measures int8's answers with ``EXACT_PRODUCT``,
float32 matrix products of chunks short enough that every partial sum is an integer float32 holds
exactly, which gives the same integers and so the same answers, at about half float32's speed.

fp8 on a GPU runs ``torch._scaled_mm`` with the row and channel scales (Hopper, Ada); the same op
runs on the CPU, emulated, which is how the suite rehearses the GPU path.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
from torch import nn

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

# x86 features with int8 dot products that torch's int8 matmul uses (torch.cpu._is_vnni_supported
# asks for avx512_vnni; AMX has its own int8 tiles). AVX-VNNI without AVX-512 is not among them:
# torch does not dispatch its int8 matmul to oneDNN there.
INT8_CPU_FEATURES = ("avx512_vnni", "amx_int8")
# Compute capability from which GPUs have fp8 tensor cores (Ada 8.9, Hopper 9.0).
FP8_COMPUTE_CAPABILITY = (8, 9)


def cpu_has_any(features: tuple[str, ...]) -> bool:
    """Whether this CPU has any of ``features``: torch's CPU feature probe, else the kernel's
    /proc/cpuinfo flags (both spell them the same way). Asked each time: callers cache."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(feature)) for feature in features)
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
            [],
        )
    except OSError:
        return False
    return any(feature in flags for feature in features)


@functools.cache
def cpu_has_int8_dot_product() -> bool:
    """Whether torch's int8 matmul runs VNNI kernels here (AVX-512 VNNI or AMX), detected at start."""
    return cpu_has_any(INT8_CPU_FEATURES)


def gpu_has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_COMPUTE_CAPABILITY


class PrecisionUnavailable(RuntimeError):
    """A quantized precision was asked of hardware that does not compute it."""


def check_hardware(quantization: str, device: torch.device) -> None:
    """Refuse, naming the feature, a precision this device would compute slower than float32."""
    if quantization == "int8" and not (device.type == "cpu" and cpu_has_int8_dot_product()):
        where = "a GPU" if device.type != "cpu" else "this CPU"
        raise PrecisionUnavailable(
            f"dtype: int8 needs a CPU with int8 dot products ({' or '.join(INT8_CPU_FEATURES)} in /proc/cpuinfo), "
            f"and {where} has none: torch's int8 matmul would run a fallback far slower than float32. Serve "
            "bfloat16 or float32 here (dtype auto picks the fastest the hardware has), or fp8 on a GPU"
        )
    if quantization == "fp8" and not gpu_has_fp8(device):
        raise PrecisionUnavailable(
            f"dtype: fp8 needs a GPU with fp8 tensor cores (compute capability {FP8_COMPUTE_CAPABILITY[0]}."
            f"{FP8_COMPUTE_CAPABILITY[1]} or more: Ada, Hopper), not {device}; on a CPU with VNNI use int8"
        )


def _row_scales(rows: torch.Tensor, largest: float) -> torch.Tensor:
    """``max |row| / largest`` per row, in float32; 1 for an all-zero row (any scale is exact there)."""
    peak = rows.detach().abs().amax(dim=-1).float()
    return torch.where(peak > 0, peak / largest, torch.ones_like(peak))


def quantize_int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in [-127, 127], float32 scale per row) with ``values × scale ≈ rows``."""
    scales = _row_scales(rows, INT8_MAX)
    values = torch.round(rows.float() / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scales


def quantize_fp8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 values, float32 scale per row) with ``values × scale ≈ rows``."""
    scales = _row_scales(rows, FP8_MAX)
    values = (rows.float() / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scales


# Inner-dimension chunk of EXACT_PRODUCT: |int8 × int8| ≤ 127² = 16,129, and 1,024 of them sum to at
# most 16,516,096 < 2^24, so each partial sum of a chunk is an integer float32 represents exactly
# whatever order the matmul adds in; the chunks are added in float64, exact up to 2^53.
EXACT_CHUNK = 1024


def exact_int8_product(values: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``values @ weight_t`` (int8 (m, k) and (k, n)) in int32, as ``torch._int_mm`` gives it: the
    exact integers, through float32 products."""
    total = None
    for start in range(0, values.shape[1], EXACT_CHUNK):
        part = values[:, start : start + EXACT_CHUNK].float() @ weight_t[start : start + EXACT_CHUNK].float()
        total = part.double() if total is None else total.add_(part)
    return total.to(torch.int32)


INT_MM: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch._int_mm
EXACT_PRODUCT: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = exact_int8_product


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights per output channel and int8 activations per token.

    ``product``: the int8 matrix product, ``INT_MM`` (serving, on a CPU with VNNI) or
    ``EXACT_PRODUCT`` (the same integers anywhere, at about half float32's speed)."""

    def __init__(self, linear: nn.Linear, product: Callable = INT_MM):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scales = quantize_int8_rows(linear.weight.detach())
        # (in, out), as the product takes its second operand: a view of the (out, in) rows, column-major.
        self.register_buffer("weight_t", values.t(), persistent=False)
        self.register_buffer("weight_scale", scales, persistent=False)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.product = product

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        shape = rows.shape
        flat = rows.reshape(-1, shape[-1])
        values, scales = quantize_int8_rows(flat)
        out = torch.mul(self.product(values, self.weight_t), scales[:, None])  # int32 × float32 → float32
        out.mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features)

    # The packed Gemma-2 forward's projection interface (core/packed_decoder.py).
    def gelu(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self(rows), approximate="tanh")

    def times(self, rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self(rows).mul_(other)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel × int8 per token"


class Fp8Linear(nn.Module):
    """``nn.Linear`` with fp8 e4m3 weights per output channel and fp8 activations per token, through
    ``torch._scaled_mm`` with row-wise scales (the layout Hopper's fp8 GEMMs take); the output is
    bf16, as the GPU kernel writes it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scales = quantize_fp8_rows(linear.weight.detach())
        self.register_buffer("weight_t", values.t(), persistent=False)  # column-major (in, out), as _scaled_mm takes it
        self.register_buffer("weight_scale", scales[None, :], persistent=False)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16), persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        shape = rows.shape
        values, scales = quantize_fp8_rows(rows.reshape(-1, shape[-1]))
        out = torch._scaled_mm(values, self.weight_t, scale_a=scales[:, None], scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=torch.bfloat16)
        return out.view(*shape[:-1], self.out_features)

    def gelu(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self(rows), approximate="tanh")

    def times(self, rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self(rows) * other

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per channel × per token"


QUANTIZED_LINEARS = (Int8Linear, Fp8Linear)


def head_modules(model: nn.Module) -> list[nn.Module]:
    """What reads only the pooled token and writes the class scores: decoders' ``score``, encoders'
    ``classifier`` (BERT's Linear, ELECTRA's head with its dense layer) and BERT's pooler."""
    found = [getattr(model, "score", None), getattr(model, "classifier", None), getattr(model.base_model, "pooler", None)]
    return [module for module in found if module is not None]


def quantize_linears(model: nn.Module, quantization: str, product: Callable = INT_MM) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` outside its classifier head by its quantized form, in
    place, one at a time (so the unquantized weights are freed as it goes); returns their names."""
    kept = {id(module) for head in head_modules(model) for module in head.modules()}
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and id(module) not in kept]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = Int8Linear(linear, product) if quantization == "int8" else Fp8Linear(linear)
        setattr(parent, child, quantized)
    return [name for name, _ in targets]
