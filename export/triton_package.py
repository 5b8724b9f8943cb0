"""Write a Triton model folder for a merged classifier:

    <repository>/<name>/config.pbtxt     the KServe v2 tensors and the engine's parameters
    <repository>/<name>/<N>/model.py     the Triton adapter (a copy of server/triton/model.py)
    <repository>/<name>/<N>/model/       the merged model (written by the merge)

``N`` is the model's version, Triton's integer version folder: 1 for a model's first export into
a repository, one more than the version served for each re-export (``next_model_version``), so
every export of a model is a version of its own, in Triton's metadata and metrics (``version``)
and in each prediction record (``model_version``). A failed export publishes nothing and uses no
number. Removing a model's folder starts its count again at 1.

and, when models record predictions, the feedback model that takes examiners' corrections:

    <repository>/feedback/config.pbtxt   its tensors (clients/patent_classifier_client/feedback_protocol.py) and the records database
    <repository>/feedback/1/model.py     its adapter (a copy of server/triton/feedback_model.py)

The folder holds everything but the Python packages of this project, which the server's
Python environment provides (``pip install .`` in NVIDIA's Triton container). Its config.pbtxt
files hold no path of the export's machine: the records database's SQLite file, the journal and
the password file are written relative to the folder holding the repository, which the server
resolves them against when it loads (core/serving_config.py ``serving_root``); a pod gives its own
through the environment instead.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from patent_classifier_client import feedback_protocol, protocol
from core.labels import LabelSet
from core.serving_config import FeedbackConfig, ServingConfig, relative_sqlite_path

TRITON_MODEL_SOURCE = Path(__file__).resolve().parent.parent / "server" / "triton" / "model.py"
FEEDBACK_MODEL_SOURCE = TRITON_MODEL_SOURCE.with_name("feedback_model.py")
MODEL_VERSION = "1"  # a model's first export; each re-export counts up (next_model_version)
MERGED_MODEL_FOLDER = "model"


def model_versions(repository: Path, name: str) -> list[int]:
    """The integer version folders of a model's folder, lowest first (Triton ignores other names)."""
    folder = Path(repository) / name
    if not folder.is_dir():
        return []
    return sorted(int(entry.name) for entry in folder.iterdir() if entry.is_dir() and entry.name.isdigit())


def served_version(repository: Path, name: str) -> str:
    """The version Triton serves (its default policy: the latest), or MODEL_VERSION for a model not yet written."""
    versions = model_versions(repository, name)
    return str(versions[-1]) if versions else MODEL_VERSION


def next_model_version(repository: Path, name: str) -> str:
    """The version a new export of ``name`` into ``repository`` gets: one more than any there."""
    versions = model_versions(repository, name)
    return str(versions[-1] + 1) if versions else MODEL_VERSION


def merged_model_dir(repository: Path, name: str, version: str | None = None) -> Path:
    """The merged model of ``version`` (by default the served one)."""
    return Path(repository) / name / (version or served_version(repository, name)) / MERGED_MODEL_FOLDER


def _tensor_block(kind: str, tensors, optional: bool) -> str:
    entries = []
    for name, data_type, dims in tensors:
        optional_line = "\n    optional: true" if optional else ""
        entries.append(
            f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ {", ".join(map(str, dims))} ]{optional_line}\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _parameters_block(parameters: dict[str, str]) -> str:
    def quoted(value: str) -> str:  # a protobuf text-format string
        return value.replace("\\", "\\\\").replace('"', '\\"')

    return "".join(f'parameters {{ key: "{key}" value {{ string_value: "{quoted(value)}" }} }}\n' for key, value in parameters.items())


def relative_records_paths(config: ServingConfig | FeedbackConfig, root: Path):
    """``config`` with its records paths relative to ``root``, the folder that will hold the repository."""
    root = Path(root).resolve()
    update = {}
    if config.records_database is not None:
        update["records_database"] = relative_sqlite_path(config.records_database, root)
    for field in ("records_journal", "records_password_file"):
        path = getattr(config, field, None)
        if path is not None and path.is_absolute():
            update[field] = Path(os.path.relpath(path, root))
    return config.model_copy(update=update)


def config_pbtxt(name: str, config: ServingConfig) -> str:
    parameters = _parameters_block(config.to_triton_parameters())
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        # The engine batches across requests by tokens, so Triton must not batch or split them:
        # each request reaches execute() as it arrives and is answered through its response sender.
        # (Tensors carry a document dimension of their own, so Triton's batch dimension stays off.)
        "max_batch_size: 0\n"
        + _tensor_block("input", protocol.INPUT_TENSORS, optional=True)
        + _tensor_block("output", protocol.OUTPUT_TENSORS, optional=False)
        + _instance_group(config)
        + parameters
    )


def _instance_group(config: ServingConfig) -> str:
    """Triton's instance_group: one engine per instance, each in a stub of its own (core.serving_config.ModelInstances)."""
    instances = config.instances
    if instances is None:
        # One engine, placed by the device field: KIND_MODEL leaves the device to the model.
        return "instance_group [ { kind: KIND_MODEL count: 1 } ]\n"
    if instances.gpus is None:
        return f"instance_group [ {{ kind: KIND_CPU count: {instances.count} }} ]\n"
    # Without a gpus list Triton places count instances on every GPU it sees.
    gpus = "" if instances.gpus == "all" else f" gpus: [ {', '.join(map(str, instances.gpus))} ]"
    return f"instance_group [ {{ kind: KIND_GPU count: {instances.count}{gpus} }} ]\n"


def write_triton_model(
    repository: Path, name: str, config: ServingConfig, version: str | None = None, serving_root: Path | None = None
) -> Path:
    """The model's folder, its ``version`` folder (by default the served one) holding the adapter;
    ``num_labels`` is filled in from the merged model when it is already there. ``serving_root``:
    the folder that holds the repository the folder is published into (default: the one holding
    ``repository``), which records paths are written relative to."""
    model_folder = repository / name
    version_folder = model_folder / (version or served_version(repository, name))
    version_folder.mkdir(parents=True, exist_ok=True)
    model_dir = version_folder / config.model_dir  # an absolute model_dir stays as it is
    if config.num_labels is None and model_dir.is_dir():
        config = config.model_copy(update={"num_labels": len(LabelSet.for_model_dir(model_dir))})
    records_root = serving_root or Path(repository).resolve().parent
    (model_folder / "config.pbtxt").write_text(config_pbtxt(name, relative_records_paths(config, records_root)), encoding="utf-8")
    shutil.copyfile(TRITON_MODEL_SOURCE, version_folder / "model.py")
    return model_folder


def write_feedback_model(repository: Path, config: FeedbackConfig, serving_root: Path | None = None) -> Path:
    model_folder = repository / feedback_protocol.FEEDBACK_MODEL
    (model_folder / MODEL_VERSION).mkdir(parents=True, exist_ok=True)
    (model_folder / "config.pbtxt").write_text(
        f'name: "{feedback_protocol.FEEDBACK_MODEL}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        + _tensor_block("input", feedback_protocol.INPUT_TENSORS, optional=True)
        + _tensor_block("output", feedback_protocol.OUTPUT_TENSORS, optional=False)
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        + _parameters_block(relative_records_paths(config, serving_root or Path(repository).resolve().parent).to_triton_parameters()),
        encoding="utf-8",
    )
    shutil.copyfile(FEEDBACK_MODEL_SOURCE, model_folder / MODEL_VERSION / "model.py")
    return model_folder
