"""Write a Triton model folder for a merged classifier:

    <repository>/<name>/config.pbtxt     the KServe v2 tensors and the engine's parameters
    <repository>/<name>/1/model.py       the Triton adapter (a copy of server/triton/model.py)
    <repository>/<name>/1/model/         the merged model (written by the merge)

The folder holds everything but the Python packages of this project, which the server's
Python environment provides (``pip install .`` in NVIDIA's Triton container).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from core import protocol
from core.labels import LabelSet
from core.serving_config import ServingConfig

TRITON_MODEL_SOURCE = Path(__file__).resolve().parent.parent / "server" / "triton" / "model.py"
MODEL_VERSION = "1"
MERGED_MODEL_FOLDER = "model"


def merged_model_dir(repository: Path, name: str) -> Path:
    return repository / name / MODEL_VERSION / MERGED_MODEL_FOLDER


def _tensor_block(kind: str, tensors, optional: bool) -> str:
    entries = []
    for name, data_type, dims in tensors:
        optional_line = "\n    optional: true" if optional else ""
        entries.append(
            f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: [ {", ".join(map(str, dims))} ]{optional_line}\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def config_pbtxt(name: str, config: ServingConfig) -> str:
    parameters = "".join(
        f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'
        for key, value in config.to_triton_parameters().items()
    )
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        # The engine batches across requests by tokens, so Triton must not batch or split them:
        # each request reaches execute() as it arrives and is answered through its response sender.
        # (Tensors carry a document dimension of their own, so Triton's batch dimension stays off,
        # except for the dynamic-batcher baseline, which needs it to batch at all.)
        f"max_batch_size: {config.max_batch_size if config.batching == 'triton_dynamic' else 0}\n"
        + _tensor_block("input", protocol.INPUT_TENSORS, optional=True)
        + _tensor_block("output", protocol.OUTPUT_TENSORS, optional=False)
        + _scheduling_block(config)
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


def _scheduling_block(config: ServingConfig) -> str:
    if config.batching != "triton_dynamic":
        return ""
    # Baseline only: let Triton group requests arriving within 2 ms into one execute() call.
    return "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"


def write_triton_model(repository: Path, name: str, config: ServingConfig) -> Path:
    """The model's folder; ``num_labels`` is filled in from the merged model when it is already there."""
    model_folder = repository / name
    (model_folder / MODEL_VERSION).mkdir(parents=True, exist_ok=True)
    model_dir = model_folder / MODEL_VERSION / config.model_dir  # an absolute model_dir stays as it is
    if config.num_labels is None and model_dir.is_dir():
        config = config.model_copy(update={"num_labels": len(LabelSet.for_model_dir(model_dir))})
    (model_folder / "config.pbtxt").write_text(config_pbtxt(name, config), encoding="utf-8")
    shutil.copyfile(TRITON_MODEL_SOURCE, model_folder / MODEL_VERSION / "model.py")
    return model_folder
