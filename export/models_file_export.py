"""Build a Triton model repository from a models file: each model merged (LoRA) or saved (full
fine-tune), proven, and given its Triton folder and parameters. This is the one way models are
exported: a single model is a one-entry models file.

Each model's folder is built and proven in staging and replaces the served one in one rename
(``export.repository_staging``); a model that fails leaves its served folder as it was, and
the error says so. The repository then holds exactly the file's models: a folder of ours (it
has our ``model.py``) for a model the file no longer lists is removed, so it is not served by mistake.
When a model records predictions, the repository also gets the ``feedback`` model (docs/feedback.md).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from patent_classifier_client.errors import InvalidInput
from patent_classifier_client.feedback_protocol import FEEDBACK_MODEL
from core.labels import LabelSet
from core.models_file import ModelsFile, ServedModel
from export.merged_model_export import DEFAULT_PROOF_MEMORY_GIB, MergeReport, export_classifier
from export.model_support import UnsupportedModel, check_servable
from export.precision_agreement import labelled_texts, settle_served_precision
from export.repository_staging import RepositoryStaging
from export.triton_package import merged_model_dir, next_model_version, write_feedback_model, write_triton_model

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
        if model.labelled_file is not None:
            try:
                labelled_texts(model.labelled_file)
            except (InvalidInput, OSError) as exc:
                raise UnsupportedModel(f"model {model.name}: labelled_file: {exc}") from None


def export_model(
    staging: RepositoryStaging, model: ServedModel, device: str = "cpu", proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB
) -> MergeReport:
    staged = staging.new_repository()
    version = next_model_version(staging.repository, model.name)
    try:
        out_dir = merged_model_dir(staged, model.name, version)
        report = export_classifier(model, out_dir, device=device, proof_memory_gib=proof_memory_gib)
        serving, agreement = settle_served_precision(model, out_dir, device, proof_memory_gib)
        for measured in agreement.measured:
            log.info("%s: %s", model.name, agreement.describe(measured.dtype))
        write_triton_model(staged, model.name, serving, version, serving_root=staging.repository.resolve().parent)
    except BaseException:
        staging.discard(staged)
        served = staging.repository / model.name
        outcome = (
            f"{served} is unchanged: the previous export is still served" if served.exists()
            else f"nothing was written to {served}"
        )
        log.error("%s: not exported; %s", model.name, outcome)
        raise
    staging.publish(staged, model.name)
    log.info("%s: published as version %s", model.name, version)
    return report


def export_models(
    models: ModelsFile, repository: Path, only: list[str] | None = None, device: str = "cpu",
    proof_memory_gib: float = DEFAULT_PROOF_MEMORY_GIB,
) -> dict[str, MergeReport]:
    check_models(models)
    selected = [models.model(name) for name in only] if only else list(models.models)
    reports = {}
    with RepositoryStaging(repository) as staging:
        for model in selected:
            started = time.perf_counter()
            reports[model.name] = export_model(staging, model, device, proof_memory_gib)
            log.info("%s exported and proven in %.1f s", model.name, time.perf_counter() - started)
        if models.records_database is not None:
            staged = staging.new_repository()
            write_feedback_model(staged, models.feedback_config, serving_root=staging.repository.resolve().parent)
            staging.publish(staged, FEEDBACK_MODEL)
        if not only:
            remove_unlisted_models(staging, set(models.triton_models))
    return reports


def remove_unlisted_models(staging: RepositoryStaging, listed: set[str]) -> list[str]:
    removed = []
    for config in sorted(staging.repository.glob("*/config.pbtxt")):
        folder = config.parent
        if folder.name not in listed and any(folder.glob("*/model.py")):
            staging.remove(folder.name)
            removed.append(folder.name)
            log.warning("removed %s from %s: the models file no longer lists it", folder.name, staging.repository)
    return removed
