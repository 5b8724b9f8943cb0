"""Export one classifier into a model folder and prove the folder computes what its sources compute.

The weights are written tensor by tensor (``export.streamed_merge``): a LoRA adapter merged into
its base (which may be a ``*ForCausalLM`` such as google/gemma-2-9b: the merge builds the
classifier, its head from the adapter's ``modules_to_save``), or a full fine-tune copied. The
config (``*ForSequenceClassification``, labels, pad token, dtype), tokenizer and ``labels.tsv``
go beside them.

The proof runs the reference (the base with the adapter unmerged, as the fine-tune evaluated
it; for a full fine-tune the source model) and the saved files on the same fixed patents, all in
float32, and compares class logits. The export refuses past ``MERGE_TOLERANCE``:
- ``merged_in_float32``: the merged weights before the cast to the saved dtype (for a float32
  export, the saved files themselves) — the gate on the merge;
- ``saved_model``: the saved files as the server loads them; gated for float32 exports, reported
  for bfloat16/float16 ones, whose rounding it measures.

Memory: a model whose float32 weights fit ``proof_memory_gib`` is proven whole, through
transformers' and PEFT's own loading (``from_pretrained``, ``PeftModel``). A bigger one is run layer
by layer (``export.layer_streaming``), which needs the model's layers in a list (decoders and
encoders of the transformers library: Gemma-2, Llama, BERT, ELECTRA). One pass over the weights
per side per ``STREAMED_BATCH`` documents: slow on a CPU, but within the budget.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from core.hf_classifier import DTYPES, class_logits, encode_texts, load_sequence_classifier, load_tokenizer
from core.labels import LABELS_FILENAME, LabelSet
from core.models_file import ServedModel
from core.synthetic_patents import synthetic_patents
from export.checkpoint_files import CheckpointFolder
from export.classifier_layout import ClassifierLayout, sequence_classifier_architecture
from export.layer_streaming import STREAMED_BATCH, LayerStreamedClassifier, streamed_memory_bytes
from export.lora_adapter import LoraAdapter
from export.model_support import UnsupportedModel, ensure_pad_token
from export.streamed_merge import BaseWeights, MergedWeights, write_merged_checkpoint

MERGE_TOLERANCE = 1e-4  # float32 max |Δlogit| between the reference and the exported weights
DEFAULT_PROOF_MEMORY_GIB = 8.0
PROOF_SEED = 20240531
REPORT_FILENAME = "merge_report.json"
WHOLE, LAYER_BY_LAYER = "whole model", "layer by layer"


class MergeProofFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class LogitComparison:
    documents: int
    max_abs_logit_diff: float
    top1_agreement: float  # share of documents whose argmax class is the same

    @classmethod
    def between(cls, reference: np.ndarray, candidate: np.ndarray) -> "LogitComparison":
        return cls(
            documents=int(reference.shape[0]),
            max_abs_logit_diff=float(np.abs(reference - candidate).max()),
            top1_agreement=float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
        )


@dataclass(frozen=True)
class MergeReport:
    base: str
    adapter: str | None  # None: a full fine-tune, exported as it is
    saved_dtype: str
    max_length: int
    tolerance: float
    merged_in_float32: LogitComparison | None  # the gate: reference vs merged, both float32 (None: nothing merged)
    saved_model: LogitComparison  # reference (float32) vs the saved files, reloaded (cast effect included)
    proof: str = WHOLE  # WHOLE or LAYER_BY_LAYER
    proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB
    merged_weights: int = 0  # weights a LoRA update was merged into
    dropped_tensors: list[str] = field(default_factory=list)  # base tensors of another head (lm_head, ...)
    write_seconds: float = 0.0
    proof_seconds: float = 0.0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def proof_texts(count: int) -> list[str]:
    return [document.render() for document in synthetic_patents(count, seed=PROOF_SEED)]


def classifier_config(model: ServedModel, labels: LabelSet | None) -> PretrainedConfig:
    """The exported classifier's config: the base's, as a ``*ForSequenceClassification`` over ``labels``."""
    config = AutoConfig.from_pretrained(model.base)
    if model.adapter is not None or labels is not None:
        if model.adapter is None and len(labels) != config.num_labels:
            raise UnsupportedModel(f"{model.base}: the model has {config.num_labels} classes but {len(labels)} labels are listed")
        config.num_labels = len(labels)
        config.id2label = labels.id2label()
        config.label2id = {code: index for index, code in labels.id2label().items()}
    config.architectures = [sequence_classifier_architecture(config)]
    return config


class ExportProof:
    """The reference and the exported folder run on the proof's patents, whole or layer by layer."""

    def __init__(
        self, model: ServedModel, config: PretrainedConfig, base: BaseWeights, adapter: LoraAdapter | None,
        tokenizer: PreTrainedTokenizerBase, *, device: str, proof_memory_gib: float,
    ):
        self.model, self.config, self.base, self.adapter, self.tokenizer = model, config, base, adapter, tokenizer
        self.device, self.proof_memory_gib = device, proof_memory_gib
        self.texts = proof_texts(model.proof_documents)
        self.max_length = model.serving.max_length
        budget = proof_memory_gib * 2**30
        whole = base.layout.float32_bytes() + (adapter.nbytes if adapter is not None else 0)
        encoded = [item.token_ids for item in encode_texts(tokenizer, self.texts, self.max_length)]
        distinct_tokens = max(
            len({token for ids in encoded[start : start + STREAMED_BATCH] for token in ids})
            for start in range(0, len(encoded), STREAMED_BATCH)
        )
        streamed = streamed_memory_bytes(config, adapter, embedding_rows=distinct_tokens)
        if whole <= budget:
            self.mode = WHOLE
        elif streamed <= budget:
            self.mode = LAYER_BY_LAYER
        else:
            raise UnsupportedModel(
                f"{model.name}: the proof needs {whole / 2**30:.3g} GiB of float32 weights whole, or "
                f"{streamed / 2**30:.3g} GiB layer by layer, but proof_memory_gib is {proof_memory_gib:g}"
            )

    def _run(self, model) -> np.ndarray:
        # Both ways in the same batches, so a model proven whole or layer by layer computes the same.
        logits = model.logits(self.tokenizer, self.texts, self.max_length) if isinstance(model, LayerStreamedClassifier) \
            else class_logits(model, self.tokenizer, self.texts, self.max_length, batch_size=STREAMED_BATCH)
        del model
        gc.collect()
        return logits

    def reference(self) -> np.ndarray:
        if self.mode == LAYER_BY_LAYER:
            return self._run(LayerStreamedClassifier(self.config, self.base, self.device, adapter=self.adapter))
        if self.adapter is None:
            return self._run(load_sequence_classifier(self.model.base, torch.float32, self.device))
        from peft import PeftModel

        base = load_sequence_classifier(
            self.model.base, torch.float32, self.device, num_labels=self.config.num_labels,
            id2label=self.config.id2label, label2id=self.config.label2id,
        )
        base.config.pad_token_id = self.config.pad_token_id
        return self._run(PeftModel.from_pretrained(base, self.adapter.folder).eval())

    def merged(self) -> np.ndarray:
        """The merged weights in float32, before any cast: computed from base and adapter."""
        weights = MergedWeights(self.base, self.adapter)
        return self._run(LayerStreamedClassifier(self.config, weights, self.device, stream=self.mode == LAYER_BY_LAYER))

    def saved(self, folder: Path) -> np.ndarray:
        if self.mode == WHOLE:
            return self._run(load_sequence_classifier(folder, torch.float32, self.device))
        config = AutoConfig.from_pretrained(folder)
        saved = BaseWeights(CheckpointFolder(folder), ClassifierLayout(config))
        if saved.dropped:
            raise MergeProofFailed(f"{folder}: the saved files hold tensors the classifier has no place for: {saved.dropped[:5]}")
        return self._run(LayerStreamedClassifier(config, saved, self.device))


def _sources(model: ServedModel, tokenizer_folder: Path | None = None):
    labels = LabelSet.read_tsv(model.labels) if model.labels is not None else None
    adapter = LoraAdapter(model.adapter) if model.adapter is not None else None
    if tokenizer_folder is None:
        tokenizer_folder = model.adapter if adapter and (model.adapter / "tokenizer_config.json").exists() else model.base
    tokenizer = load_tokenizer(tokenizer_folder)
    config = classifier_config(model, labels)
    ensure_pad_token(tokenizer, config, tokenizer_folder)
    base = BaseWeights(CheckpointFolder(model.base), ClassifierLayout(config))
    return labels or LabelSet.from_id2label(config.id2label), adapter, tokenizer, config, base


def export_classifier(
    model: ServedModel, out_dir: Path, *, device: str = "cpu", proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB
) -> MergeReport:
    """Write ``model``'s classifier into ``out_dir`` and prove it; ``MergeProofFailed`` past tolerance."""
    labels, adapter, tokenizer, config, base = _sources(model)
    out_dir.mkdir(parents=True)
    # Saved before the proof tokenizes: a fast tokenizer keeps the last call's truncation in its state.
    tokenizer.save_pretrained(out_dir)
    proof = ExportProof(model, config, base, adapter, tokenizer, device=device, proof_memory_gib=proof_memory_gib)

    started = time.perf_counter()
    written = write_merged_checkpoint(base, adapter, out_dir, DTYPES[model.weights_dtype])
    config.dtype = model.weights_dtype
    config.save_pretrained(out_dir)
    labels.write_tsv(out_dir / LABELS_FILENAME)
    write_seconds = time.perf_counter() - started

    started = time.perf_counter()
    reference = proof.reference()
    saved_model = LogitComparison.between(reference, proof.saved(out_dir))
    if adapter is None:
        merged_in_float32 = None
    elif model.weights_dtype == "float32":
        merged_in_float32 = saved_model  # the saved files are the float32 merge
    else:
        merged_in_float32 = LogitComparison.between(reference, proof.merged())
    report = MergeReport(
        base=str(model.base), adapter=str(model.adapter) if adapter else None, saved_dtype=model.weights_dtype,
        max_length=proof.max_length, tolerance=MERGE_TOLERANCE, merged_in_float32=merged_in_float32,
        saved_model=saved_model, proof=proof.mode, proof_memory_gib=proof_memory_gib,
        merged_weights=written.merged_weights, dropped_tensors=written.dropped,
        write_seconds=round(write_seconds, 2), proof_seconds=round(time.perf_counter() - started, 2),
    )
    report.write(out_dir / REPORT_FILENAME)
    if merged_in_float32 is not None:
        _enforce(merged_in_float32, MERGE_TOLERANCE, "merged (float32, before saving)")
    if model.weights_dtype == "float32":
        _enforce(saved_model, MERGE_TOLERANCE, f"saved model in {out_dir}")
    return report


def verify_export(
    model: ServedModel, merged_dir: Path, *, device: str = "cpu", proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB,
    tolerance: float = MERGE_TOLERANCE,
) -> LogitComparison:
    """Re-run the proof against an exported folder on disk; ``MergeProofFailed`` past tolerance."""
    _, adapter, tokenizer, config, base = _sources(model, tokenizer_folder=merged_dir)
    proof = ExportProof(model, config, base, adapter, tokenizer, device=device, proof_memory_gib=proof_memory_gib)
    comparison = LogitComparison.between(proof.reference(), proof.saved(merged_dir))
    _enforce(comparison, tolerance, f"saved model in {merged_dir}")
    return comparison


def _enforce(comparison: LogitComparison, tolerance: float, what: str) -> None:
    if not comparison.max_abs_logit_diff <= tolerance:  # also catches NaN
        raise MergeProofFailed(
            f"{what}: max |Δlogit| {comparison.max_abs_logit_diff:.3g} over {comparison.documents} documents "
            f"exceeds the tolerance {tolerance:g} (top-1 agreement {comparison.top1_agreement:.1%})"
        )
