"""The served precisions against float32: do bf16, int8 or fp8 change the answers?

After the proof (which always runs in float32), the export runs the saved model in float32 and in
each precision the server may compute in, on the same patents: the proof's generated patents
(``agreement_documents`` of them, the proof's own first) and, where the models file names one,
every patent of the model's labelled file. For each precision it records the share of patents whose
top class is float32's, the largest |Δprobability| and, on the labelled patents, the accuracy and
its change from float32's, in ``precision_report.json`` beside the weights
(``core.served_precision.PrecisionReport``). The engines read that report when they start: they
serve int8 or fp8 only where it accepted them, and ``auto`` skips what it refused.

The precisions measured: the configured ``dtype``; for ``auto``, int8 (PyTorch engine) and bf16,
what ``auto`` may compute in on whichever machine ends up serving the export
(``core.served_precision.served_precision``). Below ``min_top1_agreement`` an explicit dtype is
refused (the export fails, naming the figures); under ``auto`` a refused precision is only skipped.

Each runs the forward pass the PyTorch engine runs for it: on a CPU, Gemma-2's packed one
(``core.packed_decoder``: bf16 and int8 keep the residual stream in float32) unless packing is off
or the engine is vLLM; fp8 (a GPU's precision) through transformers'. int8 multiplies with
``core.quantized_linear.EXACT_PRODUCT`` where the CPU has no VNNI: the same integers the VNNI
server computes. bf16 runs the model whole when its float32 weights fit ``proof_memory_gib``, else
layer by layer (``export.layer_streaming``), whose bf16 rounds the stream after every sublayer: a
lower agreement than the server's, if anything. int8 and fp8 always run whole, quantized as they
load, in about a quarter of float32's memory.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from patent_classifier_client.errors import InvalidInput
from core.hf_classifier import class_logits, encode_texts, load_sequence_classifier, load_tokenizer, resolve_device, softmax
from core.labels import LabelSet
from core.models_file import ServedModel
from core.packed_decoder import PackedGemma2, serves_packed
from patent_classifier_client.patent_document import json_object, patent_document
from core.quantized_linear import EXACT_PRODUCT, INT_MM, cpu_has_int8_dot_product
from core.served_precision import (
    REFERENCE_DTYPE,
    REPORT_FILENAME,
    MeasuredPrecision,
    PrecisionRefused,
    PrecisionReport,
    compute_dtype,
    quantization,
)
from core.serving_config import ServingConfig
from core.text_preprocessing import text_preprocessor
from export.checkpoint_files import CheckpointFolder
from export.classifier_layout import ClassifierLayout
from export.layer_streaming import STREAMED_BATCH, LayerStreamedClassifier
from export.merged_model_export import DEFAULT_PROOF_MEMORY_GIB, proof_texts
from export.streamed_merge import BaseWeights

log = logging.getLogger(__name__)

def measured_dtypes(serving: ServingConfig) -> list[str]:
    """The precisions the server may compute in: the configured one; for ``auto``, int8 (PyTorch
    engine only) and bf16; none for float32, the reference itself."""
    if serving.dtype == "auto":
        return (["int8"] if serving.engine == "torch" else []) + ["bfloat16"]
    return [] if serving.dtype == REFERENCE_DTYPE else [serving.dtype]


def labelled_patents(path: Path) -> list[tuple[str, str | None]]:
    """(patent as the server renders it, its label) for each line of a labelled file. Only what the
    export needs is read here; `make eval` checks the rest of the file (clients/patent_classifier_client/evaluation.py)."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{Path(path).name} line {number}"
        fields = json_object(line, where)
        record = {key: value for key, value in fields.items() if key not in ("id", "label")}
        document = patent_document(record, where)
        rows.append((document if isinstance(document, str) else document.render(), fields.get("label")))
    if not rows:
        raise InvalidInput(str(path), "holds no labelled patents")
    return rows


def labelled_texts(path: Path) -> list[str]:
    return [text for text, _ in labelled_patents(path)]


def agreement_texts(model: ServedModel) -> tuple[list[str], list[str | None]]:
    """The patents to compare on, as the model reads them (after its text cleaning), and the labels
    of the last of them, those from the labelled file."""
    texts = proof_texts(model.agreement_documents)
    labelled = labelled_patents(model.labelled_file) if model.labelled_file else []
    preprocess = text_preprocessor(model.serving.preprocessing)
    texts += [text for text, _ in labelled]
    return ([preprocess(text) for text in texts] if preprocess else texts), [label for _, label in labelled]


def compare_precisions(model_dir: Path, serving: ServingConfig, texts: list[str], device: str, dtypes: list[str],
                       proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB) -> dict[str, np.ndarray]:
    """Logits of float32 and of each of ``dtypes`` on ``texts``, one model in memory at a time
    (the module's docstring says which forward pass each runs)."""
    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    layout = ClassifierLayout(config)
    whole = layout.float32_bytes() <= proof_memory_gib * 2**30
    packs = serves_packed(serving, config, resolve_device(device))
    logits = {}
    for name in [REFERENCE_DTYPE, *dtypes]:
        quantized = quantization(name)
        if whole or quantized:
            model = load_sequence_classifier(model_dir, compute_dtype(name), device, quantization=quantized,
                                             int8_product=INT_MM if cpu_has_int8_dot_product() else EXACT_PRODUCT)
            if packs and name in ("bfloat16", "int8"):
                logits[name] = packed_logits(PackedGemma2(model), tokenizer, texts, serving.max_length)
            else:
                logits[name] = class_logits(model, tokenizer, texts, serving.max_length, batch_size=STREAMED_BATCH)
        else:  # layer by layer through transformers' layers: in bf16, a stream rounded after every sublayer
            model = LayerStreamedClassifier(config, BaseWeights(CheckpointFolder(model_dir), layout), device, dtype=compute_dtype(name))
            logits[name] = model.logits(tokenizer, texts, serving.max_length)
        del model
        gc.collect()
    return logits


def packed_logits(packed: PackedGemma2, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    encoded = [item.token_ids for item in encode_texts(tokenizer, texts, max_length)]
    return torch.cat([packed.logits(encoded[first : first + STREAMED_BATCH])
                      for first in range(0, len(encoded), STREAMED_BATCH)]).numpy()


def accuracy(logits: np.ndarray, labels: list[str | None], codes: list[str]) -> float | None:
    """Share of the labelled patents (the last ``len(labels)`` rows of ``logits``) whose top class is their label."""
    if not labels:
        return None
    predicted = [codes[index] for index in logits[len(logits) - len(labels):].argmax(-1)]
    return float(np.mean([label == code for label, code in zip(labels, predicted)]))


def measure(dtype: str, reference: np.ndarray, served: np.ndarray, labels: list[str | None], codes: list[str],
            min_top1_agreement: float) -> MeasuredPrecision:
    top1 = float((reference.argmax(-1) == served.argmax(-1)).mean())
    served_accuracy, reference_accuracy = accuracy(served, labels, codes), accuracy(reference, labels, codes)
    return MeasuredPrecision(
        dtype=dtype, top1_agreement=top1, max_abs_probability_diff=float(np.abs(softmax(reference) - softmax(served)).max()),
        accuracy=served_accuracy, accuracy_change=None if served_accuracy is None else served_accuracy - reference_accuracy,
        accepted=top1 >= min_top1_agreement,
    )


def settle_served_precision(
    model: ServedModel, model_dir: Path, device: str = "cpu", proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB
) -> tuple[ServingConfig, PrecisionReport]:
    """Measure the precisions the exported ``model_dir`` may be served in, write the report beside
    it, and return the serving configuration to write. Raises ``PrecisionRefused`` for an explicit
    precision below ``min_top1_agreement``; under ``auto`` the engines skip what the report refused."""
    dtypes = measured_dtypes(model.serving)
    texts, labels = agreement_texts(model) if dtypes else ([], [])
    codes = LabelSet.for_model_dir(model_dir).codes
    logits = compare_precisions(model_dir, model.serving, texts, device, dtypes, proof_memory_gib) if dtypes else {}
    reference = logits.get(REFERENCE_DTYPE)
    report = PrecisionReport(
        reference_dtype=REFERENCE_DTYPE, device=str(device), documents=len(texts), labelled_documents=len(labels),
        reference_accuracy=accuracy(reference, labels, codes) if dtypes else None,
        min_top1_agreement=model.min_top1_agreement,
        measured=tuple(measure(name, reference, logits[name], labels, codes, model.min_top1_agreement) for name in dtypes),
        serving_dtype=model.serving.dtype,
    )
    report.write(model_dir)
    refused = [entry.dtype for entry in report.measured if not entry.accepted]
    if refused and model.serving.dtype != "auto":
        raise PrecisionRefused(f"model {model.name}: dtype {model.serving.dtype} refused: {report.describe(model.serving.dtype)}")
    for name in refused:
        log.warning("model %s: dtype auto will not compute in %s: %s", model.name, name, report.describe(name))
    return model.serving, report
