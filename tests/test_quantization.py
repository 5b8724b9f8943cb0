"""int8 and fp8: linear layers quantized per output channel (weights) and per token (activations),
held to bounds derived from the quantization step, never the classifier head, and served only where
the hardware computes them and the export's agreement gate accepted them."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from core import hf_classifier, quantized_linear
from core.quantized_linear import (
    EXACT_CHUNK,
    EXACT_PRODUCT,
    FP8_MAX,
    INT8_MAX,
    INT_MM,
    Fp8Linear,
    Int8Linear,
    PrecisionUnavailable,
    head_modules,
    quantize_linears,
)
from core.served_precision import MeasuredPrecision, PrecisionRefused, PrecisionReport, served_precision
from core.synthetic_patents import synthetic_patents
from tests.conftest import KCBERT_MODEL, KOELECTRA_MODEL, LLAMA_MODEL, MAX_LENGTH

pytestmark = pytest.mark.model  # torch, and for most tests the exported demo

FLOAT32_EPS = 2.0**-24  # unit roundoff


def random_linear(inputs: int, outputs: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        linear.weight[0] = 0.0  # an all-zero channel: its scale must not divide by zero
    return linear


def activations(rows: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows_ = torch.randn(rows, width, generator=generator)
    rows_[1] = 0.0  # an all-zero token
    rows_[2, 5] = 40.0  # an outlier: its token's step grows, no other token's does
    return rows_


# --- the quantized linear layers against float32 ------------------------------------------------------


@pytest.mark.parametrize("product", [INT_MM, EXACT_PRODUCT], ids=["torch._int_mm", "exact float32 chunks"])
def test_int8_products_are_the_exact_integers(product):
    """At the extremes (every value ±127) and across EXACT_PRODUCT's chunk boundary."""
    width = 3 * EXACT_CHUNK + 5
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-INT8_MAX, INT8_MAX + 1, (19, width), generator=generator, dtype=torch.int8)
    values[0] = INT8_MAX
    weight = torch.randint(-INT8_MAX, INT8_MAX + 1, (33, width), generator=generator, dtype=torch.int8)
    weight[0] = INT8_MAX
    weight[1] = -INT8_MAX
    exact = values.long() @ weight.long().t()
    assert torch.equal(product(values, weight.t()).long(), exact)  # the extremes: 127 × 127 × width, no saturation
    assert int(exact[0, 0]) == INT8_MAX**2 * width


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_within_its_quantization_steps_of_float32(bias):
    """Each weight moves by at most half its channel's step s_w = max|w_n|/127, each activation by
    at most half its token's step s_x = max|x_m|/127, so an output moves by at most
    s_w/2·Σ|x| + s_x/2·Σ|w| + K·s_x·s_w/4, plus the float32 rounding of scaling an exact integer sum."""
    linear = random_linear(1000, 96, bias, seed=1)
    x = activations(12, 1000, seed=2)
    served = Int8Linear(linear)(x).double()
    reference = nn.functional.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
    w, xs = linear.weight.double(), x.double()
    s_w = w.abs().amax(1) / INT8_MAX
    s_x = xs.abs().amax(1) / INT8_MAX
    bound = (s_w[None, :] / 2 * xs.abs().sum(1, keepdim=True) + s_x[:, None] / 2 * w.abs().sum(1)[None, :]
             + w.shape[1] * s_x[:, None] * s_w[None, :] / 4)
    bound += 4 * FLOAT32_EPS * (reference.abs() + (0 if linear.bias is None else linear.bias.double().abs()))
    error = (served - reference).abs()
    assert (error <= bound).all()
    assert torch.equal(served[1], torch.zeros(96, dtype=torch.float64) if not bias else linear.bias.double())  # zero token
    assert error.max() > 0  # quantization is measured, not assumed away


def test_an_int8_answer_does_not_depend_on_its_batch_mates():
    """Each token is quantized alone and multiplied in exact integers: bit for bit the same alone or in a batch."""
    layer = Int8Linear(random_linear(300, 40, True, seed=3))
    x = activations(9, 300, seed=4)
    together = layer(x)
    for row in range(len(x)):
        assert torch.equal(layer(x[row : row + 1])[0], together[row])


def test_the_exact_product_gives_what_int_mm_gives():
    linear, x = random_linear(2500, 64, True, seed=5), activations(7, 2500, seed=6)
    assert torch.equal(Int8Linear(linear, INT_MM)(x), Int8Linear(linear, EXACT_PRODUCT)(x))


def test_fp8_linear_runs_the_gpu_path_here_within_e4m3s_rounding():
    """torch._scaled_mm with row-wise scales, the op a Hopper GPU runs, here on the CPU. e4m3 keeps 3
    mantissa bits: a scaled value moves by at most 2^-4 of itself, or half the subnormal step 2^-10
    (of the 448 the scale maps the row's largest onto); the product and its bf16 output add float32
    and bf16 (2^-9) roundings."""
    linear = random_linear(512, 64, True, seed=7)
    x = activations(10, 512, seed=8)
    served = Fp8Linear(linear)(x)
    assert served.dtype == torch.bfloat16
    w, xs = linear.weight.double(), x.double()
    s_w, s_x = w.abs().amax(1) / FP8_MAX, xs.abs().amax(1) / FP8_MAX
    dw = 2.0**-4 * w.abs() + (s_w * 2.0**-10)[:, None]
    dx = 2.0**-4 * xs.abs() + (s_x * 2.0**-10)[:, None]
    reference = nn.functional.linear(xs, w, linear.bias.double())
    bound = xs.abs() @ dw.t() + dx @ w.abs().t() + dx @ dw.t()
    bound += 2.0**-8 * (reference.abs() + bound) + 2.0**-8 * linear.bias.double().abs()  # bf16 bias and output roundings
    assert ((served.double() - reference).abs() <= bound).all()


# --- which layers are quantized --------------------------------------------------------------------


def test_every_linear_layer_but_the_head_is_quantized_in_each_family(exported):
    from export.triton_package import merged_model_dir

    folders = {"gemma2": exported.merged_dir,
               **{name: merged_model_dir(exported.repository, name) for name in (LLAMA_MODEL, KCBERT_MODEL, KOELECTRA_MODEL)}}
    for name, folder in folders.items():
        model = hf_classifier.load_sequence_classifier(folder, torch.float32, quantization="int8", int8_product=EXACT_PRODUCT)
        heads = head_modules(model)
        assert heads, name
        in_head = {id(module) for head in heads for module in head.modules()}
        for module_name, module in model.named_modules():
            if id(module) in in_head:
                assert not isinstance(module, quantized_linear.QUANTIZED_LINEARS), f"{name}: {module_name} is in the head"
            else:
                assert type(module) is not nn.Linear, f"{name}: {module_name} was left in float32"
        assert all(p.dtype == torch.float32 for p in model.parameters()), name  # the rest, the head included


# --- the engine: hardware, gate, answers -------------------------------------------------------------


@pytest.fixture
def int8_cpu(monkeypatch):
    """Make the detection answer as a CPU with (True) or without (False) int8 dot products would;
    counts how often it was asked, so a test shows its answer is what decided."""
    asked = []

    def simulate(answer: bool) -> list:
        def detect() -> bool:
            asked.append(answer)
            return answer
        monkeypatch.setattr(quantized_linear, "cpu_has_int8_dot_product", detect)
        return asked
    return simulate


def gated_copy(exported, tmp_path, **accepted: bool):
    """The demo Gemma-2's weights in a folder of their own, with a precision report that accepted
    (True) or refused (False) each named precision."""
    folder = tmp_path / "model"
    shutil.copytree(exported.merged_dir, folder)
    measured = tuple(MeasuredPrecision(dtype, 1.0 if ok else 0.5, 0.01, None, None, ok) for dtype, ok in accepted.items())
    PrecisionReport("float32", "cpu", 16, 0, None, 0.99, measured, "auto").write(folder)
    return folder


def test_the_detection_reads_the_cpus_int8_features(monkeypatch):
    flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    detect = quantized_linear.cpu_has_int8_dot_product.__wrapped__
    assert detect() == ("avx512_vnni" in flags or "amx_int8" in flags)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx_vnni": True, "avx512_vnni": False})
    assert detect() is False  # AVX-VNNI alone: torch's int8 matmul has no VNNI kernel for it
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_vnni": True})
    assert detect() is True


def test_int8_is_refused_on_a_cpu_without_int8_dot_products_naming_the_features(exported, tmp_path, int8_cpu):
    from core.serving_config import ServingConfig
    from server.torch_engine import TorchEngine

    asked = int8_cpu(False)
    folder = gated_copy(exported, tmp_path, int8=True)
    with pytest.raises(PrecisionUnavailable, match="dtype: int8 needs a CPU with int8 dot products .avx512_vnni or amx_int8"):
        TorchEngine(ServingConfig(model_dir=folder, max_length=MAX_LENGTH, device="cpu", dtype="int8"))
    assert asked == [False]
    # auto goes on without it: bf16 or float32, as the CPU computes them.
    engine = TorchEngine(ServingConfig(model_dir=folder, max_length=MAX_LENGTH, device="cpu", dtype="auto"))
    assert engine.dtype in ("bfloat16", "float32")


def test_the_gate_cannot_be_bypassed_by_config(exported, tmp_path, int8_cpu):
    """An int8 the export did not measure, or measured and refused, is never served, even on a
    CPU that computes it: not when asked for, not under auto."""
    from core.serving_config import ServingConfig
    from server.torch_engine import TorchEngine

    int8_cpu(True)
    unmeasured = tmp_path / "unmeasured"
    shutil.copytree(exported.merged_dir, unmeasured)
    (unmeasured / "precision_report.json").unlink(missing_ok=True)
    with pytest.raises(PrecisionRefused, match="dtype int8 refused by the export's agreement gate: no precision_report.json"):
        TorchEngine(ServingConfig(model_dir=unmeasured, max_length=MAX_LENGTH, device="cpu", dtype="int8"))
    refused = gated_copy(exported, tmp_path / "refused", int8=False, bfloat16=False)
    with pytest.raises(PrecisionRefused, match=r"int8 gives float32's top class on 50\.0% of 16 patents .*below min_top1_agreement"):
        TorchEngine(ServingConfig(model_dir=refused, max_length=MAX_LENGTH, device="cpu", dtype="int8"))
    assert TorchEngine(ServingConfig(model_dir=refused, max_length=MAX_LENGTH, device="cpu", dtype="auto")).dtype == "float32"
    accepted = gated_copy(exported, tmp_path / "accepted", int8=True)
    assert TorchEngine(ServingConfig(model_dir=accepted, max_length=MAX_LENGTH, device="cpu", dtype="auto")).dtype == "int8"


def test_auto_resolution_follows_hardware_then_gate(int8_cpu, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    report = PrecisionReport("float32", "cpu", 8, 0, None, 0.99,
                             (MeasuredPrecision("int8", 1.0, 0.0, None, None, True), MeasuredPrecision("bfloat16", 1.0, 0.0, None, None, True)))
    monkeypatch.setattr(hf_classifier, "cpu_has_native_bf16", lambda: True)
    int8_cpu(True)
    assert served_precision("auto", cpu, "torch", report) == "int8"
    assert served_precision("auto", cpu, "vllm", report) == "bfloat16"  # vLLM has no int8 for these checkpoints
    assert served_precision("auto", gpu, "torch", report) == "bfloat16"  # auto never picks fp8
    assert served_precision("auto", cpu, "torch", None) == "bfloat16"  # no report: never int8
    int8_cpu(False)
    assert served_precision("auto", cpu, "torch", report) == "bfloat16"
    monkeypatch.setattr(hf_classifier, "cpu_has_native_bf16", lambda: False)
    assert served_precision("auto", cpu, "torch", report) == "float32"
    with pytest.raises(PrecisionUnavailable, match="fp8 needs a GPU"):
        served_precision("fp8", cpu, "torch", PrecisionReport("float32", "cpu", 8, 0, None, 0.99,
                                                              (MeasuredPrecision("fp8", 1.0, 0.0, None, None, True),)))


def test_an_int8_engine_computes_int8_and_keeps_its_head_apart(exported, tmp_path, int8_cpu, engine_factory):
    """On the exported demo Gemma-2, packed on the CPU and through transformers' padded forward:
    every projection int8, the head float32, and the answers the same model quantized offline
    gives. Packed, each row is quantized alone, multiplied in exact integers and attends within its
    own document, so a patent's answer is the offline one within float32 rounding whatever its
    batch; padded, a row's float32 input may round to the other side of a quantization step than
    offline, so there the top class must match wherever the offline int8 model's lead is clear."""
    from core.packed_decoder import PackedGemma2
    from export.precision_agreement import packed_logits
    from tests.parity import Float32Parity, assert_served_probabilities_match

    asked = int8_cpu(True)
    folder = gated_copy(exported, tmp_path, int8=True)
    texts = [d.render() for d in synthetic_patents(12, seed=21, long_share=0.5)]
    offline_model = hf_classifier.load_sequence_classifier(folder, torch.float32, quantization="int8", int8_product=EXACT_PRODUCT)
    tokenizer = hf_classifier.load_tokenizer(folder)
    offline = {"auto": packed_logits(PackedGemma2(offline_model), tokenizer, texts, MAX_LENGTH),
               "off": hf_classifier.class_logits(offline_model, tokenizer, texts, MAX_LENGTH, batch_size=1)}
    parity = Float32Parity.for_model(offline_model.config, MAX_LENGTH)
    for packing in ("auto", "off"):
        engine = engine_factory(model_dir=folder, dtype="int8", packing=packing)
        assert engine.dtype == "int8" and asked
        assert isinstance(engine._packed, PackedGemma2) == (packing == "auto")
        assert isinstance(engine._model.model.layers[0].mlp.down_proj, Int8Linear)
        assert type(engine._model.score) is nn.Linear and engine._model.score.weight.dtype == torch.float32
        futures = [engine.submit([text]) for text in texts]  # together: they share batches
        for logits, future in zip(offline[packing], futures):
            (served,) = future.result(timeout=300)
            expected = hf_classifier.softmax(logits[None])[0]
            assert served.probabilities.std() > 0  # a head quantized to nothing ties every class
            if packing == "auto":
                assert_served_probabilities_match(parity, logits, served.probabilities)
            elif np.diff(np.sort(expected)[-2:])[0] > 0.01:
                assert served.probabilities.argmax() == expected.argmax()


def test_a_head_quantized_to_ties_fails_the_gate(exported, tmp_path, monkeypatch):
    """What vLLM #35849 did (a quantized score head giving equal scores) is caught by the export:
    simulated by quantizing the head to zeros, the gate refuses int8."""
    from core.models_file import ModelsFile
    from export import precision_agreement

    original = quantize_linears

    def with_a_broken_head(model, quantization, product=INT_MM):
        names = original(model, quantization, product)
        with torch.no_grad():
            model.score.weight.zero_()
        return names

    monkeypatch.setattr(hf_classifier, "quantize_linears", with_a_broken_head)
    folder = tmp_path / "model"
    shutil.copytree(exported.merged_dir, folder)
    entry = {"name": "broken-head", "base": str(exported.demo.base), "adapter": str(exported.demo.adapter),
             "labels": str(exported.demo.labels), "agreement_documents": 8, "serving": {"max_length": MAX_LENGTH, "dtype": "int8"}}
    model = ModelsFile.parse({"models": [entry]}).models[0]
    with pytest.raises(PrecisionRefused, match="dtype int8 refused: int8 gives float32's top class on"):
        precision_agreement.settle_served_precision(model, folder)
    written = json.loads((folder / "precision_report.json").read_text())
    assert written["measured"][0]["dtype"] == "int8" and not written["measured"][0]["accepted"]
