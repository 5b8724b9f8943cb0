"""The served precision against float32: does computing in bf16 change the answers?

After the proof (which always runs in float32), the export runs the saved model once in float32
and once in the precision the server may compute in, on the same patents: the proof's generated
patents (``agreement_documents`` of them, the proof's own first) and, where the models file names
one, every patent of the model's labelled file. It records the share of patents whose top class is
the same and the largest |Δprobability| in ``precision_report.json`` beside the weights. Like the
proof, it runs the model whole when its float32 weights fit ``proof_memory_gib``, else layer by
layer (``export.layer_streaming``). The served precision runs the forward pass the PyTorch engine
runs on the export's device: on a CPU, Gemma-2's packed one (``core.packed_decoder``, whose bf16
keeps the residual stream in float32). Layer by layer it runs transformers' layers, whose bf16
rounds the stream after every sublayer: a lower agreement than the server's, if anything.

The precision measured is the configured ``dtype``, or for ``auto`` bf16: what ``auto`` computes
in on a GPU and on a CPU with native bf16 (``core.hf_classifier.resolve_dtype``), whichever
machine ends up serving the export. Below ``min_top1_agreement`` an explicit ``bfloat16`` or
``float16`` is refused (the export fails, naming both figures); ``auto`` is written as
``float32`` into the model's ``config.pbtxt``, with a warning naming them, so the server never
computes in a precision that was measured to change the answers.
"""
from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from patent_classifier_client.errors import InvalidInput
from core.hf_classifier import class_logits, DTYPES, encode_texts, load_sequence_classifier, load_tokenizer, resolve_device, softmax
from core.models_file import ServedModel
from core.packed_decoder import PackedGemma2, serves_packed
from patent_classifier_client.patent_document import json_object, patent_document
from core.serving_config import ServingConfig
from core.text_preprocessing import text_preprocessor
from export.checkpoint_files import CheckpointFolder
from export.classifier_layout import ClassifierLayout
from export.layer_streaming import STREAMED_BATCH, LayerStreamedClassifier
from export.merged_model_export import DEFAULT_PROOF_MEMORY_GIB, proof_texts
from export.streamed_merge import BaseWeights

log = logging.getLogger(__name__)

REFERENCE_DTYPE = "float32"
REPORT_FILENAME = "precision_report.json"


class PrecisionRefused(RuntimeError):
    """An explicitly configured precision disagrees with float32 more than the models file allows."""


@dataclass(frozen=True)
class PrecisionAgreement:
    measured_dtype: str  # the precision compared with float32 ("float32": nothing to compare)
    reference_dtype: str
    device: str  # where both ran
    documents: int
    labelled_documents: int  # of ``documents``, those from the labelled file
    top1_agreement: float  # share of documents whose top class is float32's
    max_abs_probability_diff: float  # over every (document, class)
    min_top1_agreement: float
    accepted: bool
    serving_dtype: str  # the dtype written into config.pbtxt after the check

    def describe(self) -> str:
        return (
            f"{self.measured_dtype} gives float32's top class on {self.top1_agreement:.1%} of {self.documents} patents "
            f"(max |Δprobability| {self.max_abs_probability_diff:.2g}), below min_top1_agreement {self.min_top1_agreement:.1%}"
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def measured_dtype(serving: ServingConfig) -> str:
    """The precision the server may compute in: the configured one; for ``auto``, bf16."""
    return "bfloat16" if serving.dtype == "auto" else serving.dtype


def labelled_texts(path: Path) -> list[str]:
    """The patents of a labelled file, rendered as the server renders them. Only what the export
    needs is read here (the text); `make eval` checks the rest of the file (clients/patent_classifier_client/evaluation.py)."""
    texts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{Path(path).name} line {number}"
        record = {key: value for key, value in json_object(line, where).items() if key not in ("id", "label")}
        document = patent_document(record, where)
        texts.append(document if isinstance(document, str) else document.render())
    if not texts:
        raise InvalidInput(str(path), "holds no labelled patents")
    return texts


def agreement_texts(model: ServedModel) -> tuple[list[str], int]:
    """The patents to compare on, as the model reads them (after its text cleaning), and how many
    came from the labelled file."""
    texts = proof_texts(model.agreement_documents)
    labelled = labelled_texts(model.labelled_file) if model.labelled_file else []
    preprocess = text_preprocessor(model.serving.preprocessing)
    texts += labelled
    return ([preprocess(text) for text in texts] if preprocess else texts), len(labelled)


def compare_precisions(model_dir: Path, serving: ServingConfig, texts: list[str], device: str,
                       proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB) -> tuple[float, float]:
    """(top-1 agreement, max |Δprobability|) of the model in the served precision against float32,
    one model in memory at a time. The served side runs the forward pass the PyTorch engine will
    run on ``device``: packed (core/packed_decoder.py, whose bf16 keeps its stream in float32) where
    the engine packs, else transformers'."""
    dtype = measured_dtype(serving)
    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    layout = ClassifierLayout(config)
    whole = layout.float32_bytes() <= proof_memory_gib * 2**30
    packed = whole and serves_packed(serving, config, resolve_device(device))
    logits = {}
    for name in (REFERENCE_DTYPE, dtype):
        if whole:
            model = load_sequence_classifier(model_dir, DTYPES[name], device)
            if packed and name == dtype:
                logits[name] = packed_logits(PackedGemma2(model), tokenizer, texts, serving.max_length)
            else:
                logits[name] = class_logits(model, tokenizer, texts, serving.max_length, batch_size=STREAMED_BATCH)
        else:  # layer by layer through transformers' layers: in bf16, a stream rounded after every sublayer
            model = LayerStreamedClassifier(config, BaseWeights(CheckpointFolder(model_dir), layout), device, dtype=DTYPES[name])
            logits[name] = model.logits(tokenizer, texts, serving.max_length)
        del model
        gc.collect()
    reference, served = logits[REFERENCE_DTYPE], logits[dtype]
    agreement = float((reference.argmax(-1) == served.argmax(-1)).mean())
    return agreement, float(np.abs(softmax(reference) - softmax(served)).max())


def packed_logits(packed: PackedGemma2, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    encoded = [item.token_ids for item in encode_texts(tokenizer, texts, max_length)]
    return torch.cat([packed.logits(encoded[first : first + STREAMED_BATCH])
                      for first in range(0, len(encoded), STREAMED_BATCH)]).numpy()


def settle_served_precision(
    model: ServedModel, model_dir: Path, device: str = "cpu", proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB
) -> tuple[ServingConfig, PrecisionAgreement]:
    """Measure the served precision of the exported ``model_dir``, write the report, and return the
    serving configuration to write (``auto`` turned into ``float32`` when bf16 was refused).
    Raises ``PrecisionRefused`` for an explicit precision below ``min_top1_agreement``."""
    dtype = measured_dtype(model.serving)
    texts, labelled = agreement_texts(model) if dtype != REFERENCE_DTYPE else ([], 0)
    top1, difference = (
        compare_precisions(model_dir, model.serving, texts, device, proof_memory_gib) if texts else (1.0, 0.0)
    )
    accepted = top1 >= model.min_top1_agreement
    serving = model.serving if accepted else model.serving.model_copy(update={"dtype": REFERENCE_DTYPE})
    agreement = PrecisionAgreement(
        measured_dtype=dtype, reference_dtype=REFERENCE_DTYPE, device=str(device), documents=len(texts),
        labelled_documents=labelled, top1_agreement=top1, max_abs_probability_diff=difference,
        min_top1_agreement=model.min_top1_agreement, accepted=accepted, serving_dtype=serving.dtype,
    )
    agreement.write(model_dir / REPORT_FILENAME)
    if not accepted and model.serving.dtype != "auto":
        raise PrecisionRefused(f"model {model.name}: dtype {model.serving.dtype} refused: {agreement.describe()}")
    if not accepted:
        log.warning("model %s: dtype auto will compute in float32: %s", model.name, agreement.describe())
    return serving, agreement
