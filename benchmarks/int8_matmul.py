"""The int8 matmul kernels a CPU offers, at one Gemma-2-9b MLP projection's shape, against float32
and bf16: speed, and whether each gives the exact integer products.

    python -m benchmarks.int8_matmul [--shape 512 3584 14336] [--repeats 3]

Measured, in one process, each the best of ``--repeats`` timings:

- float32 and bf16: torch's matmul and oneDNN's on weights packed once (what the packed Gemma-2
  forward runs);
- ``torch._int_mm`` (int8 × int8 → int32), the product ``core.quantized_linear.Int8Linear`` serves
  with, alone and as the whole layer (per-token quantization of the activations, the product, the
  scaling back to float32);
- oneDNN's ``qlinear_pointwise`` (u8 activations × s8 weights packed once, per-tensor activation
  scale), the other candidate;
- ``EXACT_PRODUCT``, the export's stand-in where there is no VNNI.

Exactness: every int8 product is compared with the exact integers (int64) on values spanning the
full int8 range; a kernel that adds u8 × s8 pairs in 16-bit lanes (without VNNI) saturates there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from patent_classifier_client.command_line import HelpFormatter
from core.quantized_linear import EXACT_PRODUCT, INT_MM, Int8Linear, cpu_has_int8_dot_product


def best_seconds(call, repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def qlinear(values_u8: torch.Tensor, weight: torch.Tensor, rows: int):
    """oneDNN's u8 × s8 linear with a unit scale: the raw integer products, in float32."""
    columns = weight.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(weight, [rows, weight.shape[1]])
    scales, zero_points = torch.ones(columns), torch.zeros(columns, dtype=torch.int64)
    return lambda: torch.ops.onednn.qlinear_pointwise(values_u8, 1.0, 128, packed, scales, zero_points, None, 1.0, 0,
                                                      torch.float32, "none", [], "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_matmul", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 3584, 14336], metavar=("ROWS", "INNER", "COLUMNS"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-slow", action="store_true", help="skip torch._int_mm where this CPU has no VNNI (a scalar loop)")
    args = parser.parse_args(argv)
    rows, inner, columns = args.shape
    operations = 2 * rows * inner * columns
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-127, 128, (rows, inner), generator=generator, dtype=torch.int8)
    weight = torch.randint(-127, 128, (columns, inner), generator=generator, dtype=torch.int8)
    exact = values.long() @ weight.long().t()

    results = {}

    def record(name: str, call, output=None) -> None:
        seconds = best_seconds(call, args.repeats)
        entry = {"tops": round(operations / seconds / 1e12, 4), "seconds": round(seconds, 4)}
        if output is not None:
            entry["max_abs_error_vs_exact_integers"] = float((output().double() - exact.double()).abs().max())
        results[name] = entry
        print(f"{name:<44} {entry['tops'] * 1000:8.1f} GOP/s" + (
            f"   max |error| {entry['max_abs_error_vs_exact_integers']:.0f}" if output is not None else ""), file=sys.stderr, flush=True)

    activations = torch.randn(rows, inner, generator=generator)
    float_weight = torch.randn(columns, inner, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = activations.to(dtype), float_weight.to(dtype)
        record(f"{dtype} torch.matmul", lambda: x @ w.t())
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        except RuntimeError as missing:  # e.g. bf16 on a CPU without AVX-512 BW/VL/DQ or AVX-NE-CONVERT
            results[f"{dtype} oneDNN packed"] = {"unavailable": str(missing)}
            print(f"{dtype} oneDNN packed: unavailable here: {missing}", file=sys.stderr)
            continue
        record(f"{dtype} oneDNN packed", lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    if cpu_has_int8_dot_product() or not args.skip_slow:
        record("int8 torch._int_mm", lambda: INT_MM(values, weight.t()), lambda: INT_MM(values, weight.t()))
        layer = Int8Linear(torch.nn.Linear(inner, columns, bias=False))
        record("int8 Int8Linear (quantize, _int_mm, scale)", lambda: layer(activations))
    shifted = (values.int() + 128).to(torch.uint8)  # u8 = s8 + 128, zero point 128: the same integers
    record("int8 oneDNN qlinear_pointwise u8×s8", qlinear(shifted, weight, rows), qlinear(shifted, weight, rows))
    record("int8 EXACT_PRODUCT (float32 chunks)", lambda: EXACT_PRODUCT(values, weight.t()), lambda: EXACT_PRODUCT(values, weight.t()))
    capabilities = torch.cpu.get_capabilities()
    summary = {
        "shape": [rows, inner, columns], "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": capabilities.get("cpu_name"), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "features": {f: bool(capabilities.get(f)) for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")},
        "int8_served_here": cpu_has_int8_dot_product(), "results": results,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
