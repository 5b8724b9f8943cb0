"""benchmarks/gpu_gemma2_9b.py, the script a session with a lent GPU runs, rehearsed whole on the
CPU with the same architecture at a tiny size: every stage but the CUDA kernels themselves."""
from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from benchmarks import gpu_gemma2_9b
from benchmarks.model_flops import classification_flops
from core import causal_flex_attention
from tests.parity import Float32Parity

pytestmark = pytest.mark.model  # the GPU script, run whole on the CPU


def test_the_gpu_script_measures_parity_throughput_and_mfu_end_to_end(tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "gpu.json"
    exit_code = gpu_gemma2_9b.main([
        "--architecture", "tiny", "--device", "cpu", "--dtype", "float32", "--attention", causal_flex_attention.NAME,
        "--model-dir", str(model_dir), "--documents", "12", "--max-batch-tokens", "2048", "--max-batch-size", "16",
        "--out", str(out),
    ])
    assert exit_code == 0
    report = json.loads(out.read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForSequenceClassification"] and len(config["id2label"]) == 188
    assert config["attn_logit_softcapping"] == 50.0 and config["dtype"] == "bfloat16"
    flops = classification_flops(model_dir)
    assert (report["flop_per_token"], report["flop_per_document"]) == (flops.per_token, flops.per_document)
    assert flops.per_token > 0 and report["matmul_tflops"] > 0

    reference, *candidates = report["attention_parity"]
    assert (reference["attention"], reference["dtype"]) == ("eager", "float32")
    assert [c["attention"] for c in candidates] == [causal_flex_attention.NAME, "eager"]
    # Float32 against float32 in another summation order: tests/parity.py's bound, for logits no
    # larger than Gemma-2's final softcap.
    allowed = Float32Parity.for_model(AutoConfig.from_pretrained(model_dir), 512).probability_tolerance(config["final_logit_softcapping"])
    assert all(c["top1_agreement"] == 1.0 and c["max_abs_prob_diff"] <= allowed for c in candidates)

    for name in ("engine_512_tokens", "engine_realistic_mix"):
        row = report[name]
        assert row["documents"] == 12 and row["batches"] >= 1
        assert row["samples_per_second"] > 0 and 0 < row["mfu"] < 1
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["speedup_over_baseline"] == round(row["samples_per_second"] / 0.785, 1)
    assert report["engine_512_tokens"]["padding_waste"] == 0.0  # every patent is 512 tokens: nothing to pad
    full = report["engine_512_tokens"]
    assert abs(full["tokens_per_second"] - 512 * 12 / full["seconds"]) <= 0.01 * full["tokens_per_second"]


def test_the_random_model_is_written_once_and_then_reused(tmp_path):
    model_dir = tmp_path / "model"
    gpu_gemma2_9b.main(["--architecture", "tiny", "--device", "cpu", "--model-dir", str(model_dir), "--write-only"])
    weights = model_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    gpu_gemma2_9b.main(["--architecture", "tiny", "--device", "cpu", "--model-dir", str(model_dir), "--write-only"])
    assert weights.stat().st_mtime_ns == written


def test_the_fp8_run_measures_the_gate_and_its_matmul_and_refuses_the_engine_without_fp8_hardware(tmp_path):
    """GPU_SESSION_DTYPE=fp8 rehearsed: fp8 against float32 on the same patents (torch._scaled_mm,
    emulated here), the report written beside the weights for the engine to read, the fp8 matmul
    measured; the engine itself needs fp8 tensor cores, so on this CPU it is refused and said so."""
    from core.served_precision import PrecisionReport

    model_dir, out = tmp_path / "model", tmp_path / "gpu.json"
    exit_code = gpu_gemma2_9b.main([
        "--architecture", "tiny", "--device", "cpu", "--dtype", "fp8", "--min-top1-agreement", "0",
        "--agreement-documents", "4", "--model-dir", str(model_dir), "--documents", "4", "--out", str(out),
    ])
    assert exit_code == 0
    report = json.loads(out.read_text())
    assert report["agreement"]["documents"] == 4 and report["agreement"]["accepted"]
    assert 0 <= report["agreement"]["top1_agreement"] <= 1 and report["agreement"]["max_abs_probability_diff"] > 0
    assert PrecisionReport.read(model_dir).accepts("fp8")
    assert report["matmul_tflops"] > 0 and "attention_parity" not in report
    assert report["engine_refused"].startswith("dtype: fp8 needs a GPU with fp8 tensor cores")
