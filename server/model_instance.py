"""One Triton model instance: which engine configuration it runs, on the device Triton gave it.

The export writes a model's ``instances`` as Triton's ``instance_group``; Triton then starts a
Python-backend stub process per instance and tells each, in ``initialize``'s arguments, its
name, its kind (``CPU``, ``GPU`` or ``MODEL``) and its device id. Each stub builds one engine,
so a model with ``{gpus: all}`` on an 8-GPU node computes on all eight.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from core.serving_config import ServingConfig


@dataclass(frozen=True)
class ModelInstance:
    name: str  # Triton's, e.g. "kscst-gemma2_0_1": the model_instance label of the metrics
    kind: str  # "CPU", "GPU" or "MODEL" (KIND_MODEL: the model places itself, by its device field)
    device_id: int  # the GPU's CUDA ordinal for a GPU instance

    @classmethod
    def from_triton_args(cls, args: dict) -> "ModelInstance":
        return cls(args["model_instance_name"], args["model_instance_kind"], int(args["model_instance_device_id"]))

    def engine_config(self, config: ServingConfig) -> ServingConfig:
        """The configuration this instance's engine runs with: the model's, on this instance's device."""
        if self.kind == "GPU" and config.engine == "vllm":
            _see_only_gpu(self.device_id)
            return config
        if self.kind == "GPU":
            return config.model_copy(update={"device": f"cuda:{self.device_id}"})
        if self.kind == "CPU" and config.engine == "torch":
            return config.model_copy(update={"device": "cpu"})
        return config


def _see_only_gpu(device_id: int) -> None:
    """vLLM's engine arguments take no device index (Triton's vllm_backend notes the same), so this
    instance's stub, and the engine-core process vLLM starts from it, are shown only their GPU.

    Triton's device id counts the GPUs this server sees: with CUDA_VISIBLE_DEVICES already set
    (a container's runtime may set it), id 1 is the second GPU of that list, not GPU 1."""
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if visible and device_id >= len(visible):
        raise ValueError(f"Triton placed this instance on GPU {device_id}, but CUDA_VISIBLE_DEVICES shows only {visible}")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[device_id] if visible else str(device_id)
