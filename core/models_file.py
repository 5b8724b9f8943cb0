"""The models file: every model one server hosts, each configured in one place.

    defaults:                      # optional; any serving field, applied to every model
      max_batch_tokens: 1024
    feedback:                      # optional, when models record predictions: the feedback model's settings
      live_accuracy_window: 200
    models:
      - name: kscst-gemma2         # the Triton model name clients call
        base: build/demo/gemma2-base
        adapter: build/demo/gemma2-kscst-lora   # optional: a PEFT LoRA adapter, merged at export
        labels: export/labels/kscst.tsv         # optional: else the model config's id2label
        weights_dtype: float32                  # dtype of the exported weights
        labelled_file: clients/examples/labelled_patents.jsonl  # optional: the served precision is measured on it too
        min_top1_agreement: 0.99                # the served precision's top-1 agreement with float32, at least
        serving: {max_length: 512, engine: torch, preprocessing: none}

``serving`` takes every field of ``ServingConfig`` except ``model_dir`` (the export places the
weights). `python -m export models` builds the model repository from this file and `python -m
server --models-file` serves exactly the models it lists. Relative paths are relative to the
file's folder. A mistake fails validation with the model's name and the field's path.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patent_classifier_client.feedback_protocol import FEEDBACK_MODEL
from core.serving_config import FeedbackConfig, ServingConfig, resolve_sqlite_path

# Triton takes the folder name as the model name, and clients put it in URLs.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# The export writes the weights here, inside the model's version folder.
EXPORTED_WEIGHTS_FOLDER = Path("model")


class ModelsFileError(ValueError):
    """The models file cannot be read or does not validate; the message names model and field."""


class ServedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Triton model name: letters, digits, '_', '.', '-'")
    base: Path = Field(description="a *ForSequenceClassification folder: the base of a LoRA, or a full fine-tune")
    adapter: Path | None = Field(None, description="PEFT LoRA adapter folder, merged into base at export")
    labels: Path | None = Field(None, description="labels TSV (code, name[, placeholder]); default: config id2label")
    weights_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the exported weights are saved in (the proof always runs in float32)"
    )
    proof_documents: int = Field(16, ge=1, le=1024, description="patents the export proves equal logits on")
    agreement_documents: int = Field(
        128, ge=1, le=4096, description="generated patents the export measures the served precision on against float32"
    )
    labelled_file: Path | None = Field(
        None, description="a labelled JSON-lines file (make eval's format): the served precision is measured on its patents too"
    )
    min_top1_agreement: float = Field(
        0.99, ge=0.0, le=1.0,
        description="share of those patents on which the served precision (bf16) must give float32's top class; "
        "below it an explicit dtype is refused and dtype auto serves float32",
    )
    serving: ServingConfig

    @field_validator("name")
    @classmethod
    def _triton_model_name(cls, name: str) -> str:
        if not _MODEL_NAME.match(name):
            raise ValueError(f"{name!r} is not a Triton model name (letters, digits, '_', '.', '-'; at most 128)")
        return name

    @model_validator(mode="after")
    def _an_adapter_needs_labels(self) -> "ServedModel":
        if self.adapter is not None and self.labels is None:
            raise ValueError("labels: required with an adapter (its base has no trained classes to name)")
        return self

    @field_validator("serving", mode="before")
    @classmethod
    def _weights_are_placed_by_the_export(cls, serving: Any) -> Any:
        if isinstance(serving, dict):
            if "model_dir" in serving:
                raise ValueError("model_dir is set by the export (the merged weights' folder); give base/adapter instead")
            serving = {**serving, "model_dir": EXPORTED_WEIGHTS_FOLDER}
        return serving


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[ServedModel, ...] = Field(min_length=1)
    feedback: dict[str, Any] = Field(
        default_factory=dict,
        description="the feedback model's settings besides the database (core/serving_config.py FeedbackConfig), "
        "for a file whose models record predictions",
    )

    @model_validator(mode="after")
    def _names_are_unique(self) -> "ModelsFile":
        names = [model.name for model in self.models]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {repeated}")
        return self

    @model_validator(mode="after")
    def _one_records_database(self) -> "ModelsFile":
        # One feedback model takes the corrections of every recording model, from one database.
        databases = {model.serving.records_database for model in self.recording_models}
        if len(databases) > 1:
            raise ValueError(f"records_database: the models that record predictions must share one database; got {sorted(databases)}")
        if databases and FEEDBACK_MODEL in self.names:
            raise ValueError(f"{FEEDBACK_MODEL!r} names the feedback model that recording predictions adds; rename this model")
        if self.feedback and not databases:
            raise ValueError("feedback: set, but no model records predictions (serving field prediction_records)")
        if databases:
            self.feedback_config  # fails here, at the boundary, naming the field
        return self

    @property
    def names(self) -> list[str]:
        return [model.name for model in self.models]

    @property
    def recording_models(self) -> list[ServedModel]:
        return [model for model in self.models if model.serving.prediction_records != "off"]

    @property
    def records_database(self) -> str | None:
        """The database the recording models share; None when no model records predictions."""
        return self.recording_models[0].serving.records_database if self.recording_models else None

    @property
    def feedback_config(self) -> FeedbackConfig:
        try:
            return FeedbackConfig(records_database=self.records_database, **self.feedback)
        except ValidationError as exc:
            raise ValueError("; ".join(f"feedback.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None

    @property
    def triton_models(self) -> list[str]:
        """What the server loads: the listed models, and the feedback model when any of them records."""
        return self.names + ([FEEDBACK_MODEL] if self.recording_models else [])

    def model(self, name: str) -> ServedModel:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model named {name!r} in the models file (it lists {self.names})")

    @classmethod
    def read(cls, path: Path) -> "ModelsFile":
        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ModelsFileError(f"{path}: cannot read the models file: {exc}") from None
        return cls.parse(document, source=str(path), base_dir=path.parent)

    @classmethod
    def parse(cls, document: Any, *, source: str = "models file", base_dir: Path = Path(".")) -> "ModelsFile":
        if not isinstance(document, dict):
            raise ModelsFileError(f"{source}: expected a mapping with 'models' (and optionally 'defaults')")
        document = dict(document)
        defaults = document.pop("defaults", None) or {}
        if not isinstance(defaults, dict):
            raise ModelsFileError(f"{source}: defaults: must be a mapping of serving fields")
        entries = document.get("models")
        if isinstance(entries, list):
            document["models"] = [
                {**entry, "serving": {**defaults, **(entry.get("serving") or {})}} if isinstance(entry, dict) else entry
                for entry in entries
            ]
        try:
            parsed = cls.model_validate(document)
        except ValidationError as exc:
            raise ModelsFileError(f"{source}: " + "; ".join(_describe(error, entries) for error in exc.errors())) from None
        return parsed.model_copy(update={"models": tuple(_resolve_paths(model, base_dir) for model in parsed.models)})


def _describe(error: dict, entries: Any) -> str:
    """``models[2] (koelectra-sentiment).serving.max_length: Input should be ...``"""
    location = list(error["loc"])
    where = ""
    if len(location) >= 2 and location[0] == "models" and isinstance(location[1], int):
        index = location[1]
        name = entries[index].get("name") if isinstance(entries, list) and isinstance(entries[index], dict) else None
        where = f"models[{index}]" + (f" ({name})" if name else "")
        location = location[2:]
    field = ".".join(str(part) for part in location)
    return ".".join(part for part in (where, field) if part) + f": {error['msg']}"


def _resolve_paths(model: ServedModel, base_dir: Path) -> ServedModel:
    def resolved(path: Path | None) -> Path | None:
        return None if path is None else (path if path.is_absolute() else base_dir / path)

    serving = model.serving
    if serving.records_database is not None:  # a relative SQLite file is relative to the models file, as paths are
        serving = serving.model_copy(update={"records_database": resolve_sqlite_path(serving.records_database, base_dir)})
    for field in ("records_journal", "records_password_file"):  # absolute here; the export writes them relative to the repository's folder
        if getattr(serving, field) is not None:
            serving = serving.model_copy(update={field: resolved(getattr(serving, field)).resolve()})
    return model.model_copy(update={
        "base": resolved(model.base), "adapter": resolved(model.adapter), "labels": resolved(model.labels),
        "labelled_file": resolved(model.labelled_file), "serving": serving,
    })
