"""Merge a LoRA adapter into its base classifier and prove the merged model answers the same;
or, for a full fine-tune (no adapter), save it for serving and prove the saved files answer the same.

The proof runs the unmerged PEFT model and the merged model on the same fixed patents and
compares class logits in float32. The export refuses to ship a merge whose max |Δlogit|
exceeds ``MERGE_TOLERANCE``; ``verify_saved_merge`` re-runs the proof against the files on
disk, so a merged folder that was altered after export fails it too.

Nothing here assumes a tiny model: the real google/gemma-2-9b base and the office's adapter
go through the same calls (on a machine with the memory for a float32 9B model, ~37 GB).
"""
from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.hf_classifier import class_logits, load_sequence_classifier, load_tokenizer
from core.labels import LABELS_FILENAME, LabelSet
from core.synthetic_patents import synthetic_patents
from export.model_support import ensure_pad_token

MERGE_TOLERANCE = 1e-4  # float32 max |Δlogit| between unmerged and merged
PROOF_SEED = 20240531
REPORT_FILENAME = "merge_report.json"


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
    merged_in_float32: LogitComparison | None  # the gate: unmerged vs merged, both float32 (None: nothing merged)
    saved_model: LogitComparison  # unmerged (or source) float32 vs the saved files, reloaded (cast effect included)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def proof_texts(count: int) -> list[str]:
    return [document.render() for document in synthetic_patents(count, seed=PROOF_SEED)]


def _adapter_head_modules(adapter_dir: Path) -> list[str]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return list(config.get("modules_to_save") or [])


def load_unmerged(base_dir: Path, adapter_dir: Path, labels: LabelSet, device: str = "cpu"):
    """The base with the adapter applied on top, float32, exactly as the fine-tune evaluated it."""
    from peft import PeftModel

    head = _adapter_head_modules(adapter_dir)
    if not {"score", "classifier"} & set(head):
        raise MergeProofFailed(
            f"{adapter_dir}: the adapter does not carry the classification head (modules_to_save={head}); "
            "merged onto the base, the head would be the base's untrained one"
        )
    base = load_sequence_classifier(
        base_dir,
        torch.float32,
        device,
        num_labels=len(labels),
        id2label=labels.id2label(),
        label2id={code: index for index, code in labels.id2label().items()},
    )
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def merge_lora(
    base_dir: Path,
    adapter_dir: Path,
    labels: LabelSet,
    out_dir: Path,
    *,
    dtype: str = "float32",
    max_length: int = 512,
    proof_documents: int = 16,
    device: str = "cpu",
) -> MergeReport:
    """Merge, save (safetensors, tokenizer, labels) and prove; raises ``MergeProofFailed`` past tolerance."""
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir)
    texts = proof_texts(proof_documents)

    model = load_unmerged(base_dir, adapter_dir, labels, device)
    ensure_pad_token(tokenizer, model.config, adapter_dir)
    unmerged = class_logits(model, tokenizer, texts, max_length)
    merged_model = model.merge_and_unload()
    merged = class_logits(merged_model, tokenizer, texts, max_length)
    merged_in_float32 = LogitComparison.between(unmerged, merged)

    _save(merged_model, tokenizer, labels, out_dir, dtype)
    del model, merged_model
    gc.collect()

    report = MergeReport(
        base=str(base_dir),
        adapter=str(adapter_dir),
        saved_dtype=dtype,
        max_length=max_length,
        tolerance=MERGE_TOLERANCE,
        merged_in_float32=merged_in_float32,
        saved_model=LogitComparison.between(unmerged, _saved_logits(out_dir, tokenizer, texts, max_length, device)),
    )
    report.write(out_dir / REPORT_FILENAME)
    _enforce(report.merged_in_float32, MERGE_TOLERANCE, "merged (float32, before saving)")
    if dtype == "float32":
        _enforce(report.saved_model, MERGE_TOLERANCE, f"saved model in {out_dir}")
    return report


def export_fine_tune(
    model_dir: Path,
    labels: LabelSet | None,
    out_dir: Path,
    *,
    dtype: str = "float32",
    max_length: int = 512,
    proof_documents: int = 16,
    device: str = "cpu",
) -> MergeReport:
    """Save a fully fine-tuned classifier (no adapter) for serving, with the same proof on the saved files.

    ``labels`` renames the classes (and must count as many as the model has); None keeps the
    config's ``id2label``."""
    tokenizer = load_tokenizer(model_dir)
    texts = proof_texts(proof_documents)
    model = load_sequence_classifier(model_dir, torch.float32, device)
    if labels is None:
        labels = LabelSet.from_id2label(model.config.id2label)
    elif len(labels) != model.config.num_labels:
        raise MergeProofFailed(f"{model_dir}: the model has {model.config.num_labels} classes but {len(labels)} labels are listed")
    model.config.id2label = labels.id2label()
    model.config.label2id = {code: index for index, code in labels.id2label().items()}
    ensure_pad_token(tokenizer, model.config, model_dir)
    source = class_logits(model, tokenizer, texts, max_length)
    _save(model, tokenizer, labels, out_dir, dtype)
    del model
    gc.collect()

    report = MergeReport(
        base=str(model_dir), adapter=None, saved_dtype=dtype, max_length=max_length, tolerance=MERGE_TOLERANCE,
        merged_in_float32=None,
        saved_model=LogitComparison.between(source, _saved_logits(out_dir, tokenizer, texts, max_length, device)),
    )
    report.write(out_dir / REPORT_FILENAME)
    if dtype == "float32":
        _enforce(report.saved_model, MERGE_TOLERANCE, f"saved model in {out_dir}")
    return report


def _save(model, tokenizer, labels: LabelSet, out_dir: Path, dtype: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dtype=getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    labels.write_tsv(out_dir / LABELS_FILENAME)


def verify_saved_merge(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, *, tolerance: float = MERGE_TOLERANCE,
    proof_documents: int = 16, device: str = "cpu",
) -> LogitComparison:
    """Re-run the proof against a merged folder on disk; raises ``MergeProofFailed`` past tolerance."""
    labels = LabelSet.for_model_dir(merged_dir)
    tokenizer = load_tokenizer(merged_dir)
    report = json.loads((merged_dir / REPORT_FILENAME).read_text(encoding="utf-8"))
    texts = proof_texts(proof_documents)
    model = load_unmerged(base_dir, adapter_dir, labels, device)
    ensure_pad_token(tokenizer, model.config, merged_dir)
    unmerged = class_logits(model, tokenizer, texts, report["max_length"])
    del model
    gc.collect()
    comparison = LogitComparison.between(unmerged, _saved_logits(merged_dir, tokenizer, texts, report["max_length"], device))
    _enforce(comparison, tolerance, f"saved model in {merged_dir}")
    return comparison


def _saved_logits(merged_dir: Path, tokenizer, texts: list[str], max_length: int, device: str) -> np.ndarray:
    model = load_sequence_classifier(merged_dir, torch.float32, device)
    logits = class_logits(model, tokenizer, texts, max_length)
    del model
    gc.collect()
    return logits


def _enforce(comparison: LogitComparison, tolerance: float, what: str) -> None:
    if not comparison.max_abs_logit_diff <= tolerance:  # also catches NaN
        raise MergeProofFailed(
            f"{what}: max |Δlogit| {comparison.max_abs_logit_diff:.3g} over {comparison.documents} documents "
            f"exceeds the tolerance {tolerance:g} (top-1 agreement {comparison.top1_agreement:.1%})"
        )
