"""Build a whole Triton model repository from a models file: each model merged (LoRA) or saved
(full fine-tune), proven, and given its Triton folder and parameters.

The repository then holds exactly the file's models: a folder of ours (it has our
``model.py``) for a model the file no longer lists is removed, so it is not served by mistake.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from core.labels import LabelSet
from core.models_file import ModelsFile, ServedModel
from export.merged_model_export import MergeReport, export_fine_tune, merge_lora
from export.model_support import UnsupportedModel, check_servable
from export.triton_package import MODEL_VERSION, merged_model_dir, write_triton_model

log = logging.getLogger(__name__)


def check_models(models: ModelsFile) -> None:
    """Everything that can be checked without loading weights, for every model, before any export."""
    for model in models.models:
        try:
            check_servable(model.base, model.serving.max_length, model.adapter)
        except UnsupportedModel as exc:
            raise UnsupportedModel(f"model {model.name}: {exc}") from None
        if model.labels is not None:
            LabelSet.read_tsv(model.labels)


def export_model(model: ServedModel, repository: Path, device: str = "cpu") -> MergeReport:
    out_dir = merged_model_dir(repository, model.name)
    labels = LabelSet.read_tsv(model.labels) if model.labels is not None else None
    common = dict(
        dtype=model.weights_dtype, max_length=model.serving.max_length, proof_documents=model.proof_documents, device=device
    )
    if model.adapter is not None:
        report = merge_lora(model.base, model.adapter, labels, out_dir, **common)
    else:
        report = export_fine_tune(model.base, labels, out_dir, **common)
    write_triton_model(repository, model.name, model.serving)
    return report


def export_models(
    models: ModelsFile, repository: Path, only: list[str] | None = None, device: str = "cpu"
) -> dict[str, MergeReport]:
    check_models(models)
    selected = [models.model(name) for name in only] if only else list(models.models)
    reports = {}
    for model in selected:
        started = time.perf_counter()
        reports[model.name] = export_model(model, repository, device)
        log.info("%s exported and proven in %.1f s", model.name, time.perf_counter() - started)
    if not only:
        remove_unlisted_models(repository, set(models.names))
    return reports


def remove_unlisted_models(repository: Path, listed: set[str]) -> list[str]:
    removed = []
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        folder = config.parent
        if folder.name not in listed and (folder / MODEL_VERSION / "model.py").exists():
            shutil.rmtree(folder)
            removed.append(folder.name)
            log.warning("removed %s from %s: the models file no longer lists it", folder.name, repository)
    return removed
