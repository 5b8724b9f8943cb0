"""Write the merged classifier's weights one tensor at a time: the base's shards in order, each
targeted weight merged with its LoRA update in float32 and saved in the export's dtype, every
other tensor copied (cast) in blocks of rows, the classification head from the adapter.

Memory holds one targeted weight with its update (or one block of rows) at a time, never a
shard or the model: the largest targeted weight of Gemma-2-9b is an MLP projection, and its
256,000-row embedding is copied in blocks. The output keeps the base's shard names and order
(``.bin`` shards become ``.safetensors``) with an index when there is more than one shard, so a
sharded 9B base gives a sharded merged model that transformers and vLLM load as usual.

Every written tensor must be finite: a NaN or ±inf in the base or the adapter, or a value
beyond the range of the export's dtype (bfloat16 and float16 overflow to inf), fails the
export, naming the tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from export.checkpoint_files import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, CheckpointError, CheckpointFolder, SafetensorsWriter, TensorSpec
from export.classifier_layout import ClassifierLayout
from export.lora_adapter import LoraAdapter


class NonFiniteWeights(CheckpointError):
    pass


class WeightSource(Protocol):
    """Float tensors by the classifier's parameter names: what the proof's forward passes read."""

    def __contains__(self, key: str) -> bool: ...

    def read(self, key: str) -> torch.Tensor: ...

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor: ...


class BaseWeights:
    """A base checkpoint seen through the classifier's names (``ClassifierLayout.target_of``)."""

    def __init__(self, checkpoint: CheckpointFolder, layout: ClassifierLayout):
        self.checkpoint, self.layout = checkpoint, layout
        self.source_of: dict[str, str] = {}
        self.dropped: list[str] = []
        for key in checkpoint.keys():
            target = layout.target_of(key)
            if target is None:
                self.dropped.append(key)
            elif target in self.source_of:
                raise CheckpointError(f"{checkpoint.folder}: {self.source_of[target]} and {key} both map to the classifier's {target}")
            else:
                self.source_of[target] = key

    def __contains__(self, key: str) -> bool:
        return key in self.source_of

    def spec(self, key: str) -> TensorSpec:
        return self.checkpoint.spec(self.source_of[key])

    def read(self, key: str) -> torch.Tensor:
        return self.checkpoint.read(self.source_of[key])

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read_rows(self.source_of[key], rows)

    def blocks(self, key: str):
        return self.checkpoint.blocks(self.source_of[key])


class MergedWeights:
    """The merged model computed on demand in float32 from the base and the adapter: the
    weights the files should hold, before the cast to the export's dtype."""

    def __init__(self, base: BaseWeights, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter

    def __contains__(self, key: str) -> bool:
        return key in self.adapter.replacements or key in self.base

    def read(self, key: str) -> torch.Tensor:
        if key in self.adapter.replacements:
            return self.adapter.replacements[key].float()
        if key in self.adapter.updates:
            return self.adapter.updates[key].merged(self.base.read(key))
        return self.base.read(key).float()

    def read_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        if key in self.adapter.replacements or key in self.adapter.updates:
            return self.read(key)[rows]
        return self.base.read_rows(key, rows).float()


@dataclass(frozen=True)
class MergedCheckpoint:
    merged_weights: int  # weights a LoRA update was merged into
    dropped: list[str]  # base tensors the classifier has no place for (another head's)


def _output_name(shard: str, single: bool) -> str:
    if single:
        return SAFETENSORS_SINGLE
    return shard.replace("pytorch_model", "model").removesuffix(".bin") + (".safetensors" if shard.endswith(".bin") else "")


def write_merged_checkpoint(base: BaseWeights, adapter: LoraAdapter | None, out_dir: Path, dtype: torch.dtype) -> MergedCheckpoint:
    """Write the classifier's weights into ``out_dir`` (``CheckpointError`` naming the tensor when
    the base and adapter do not give the classifier exactly what it expects)."""
    layout = base.layout
    replacements = adapter.replacements if adapter is not None else {}
    updates = adapter.updates if adapter is not None else {}
    for key in updates:
        if key not in base:
            raise CheckpointError(f"{adapter.folder}: the adapter updates {key}, which the base {base.checkpoint.folder} does not have")
    for key in replacements:
        if key not in layout.parameters and key not in layout.state_keys:
            raise CheckpointError(f"{adapter.folder}: modules_to_save tensor {key} is not a tensor of the classifier")
    missing = sorted(set(layout.parameters) - set(base.source_of) - set(replacements))
    if missing:
        raise CheckpointError(
            f"the classifier needs {missing[:5]}{' …' if len(missing) > 5 else ''}, which neither the base "
            f"{base.checkpoint.folder} nor the adapter's modules_to_save provide"
        )

    # Each base shard's tensors, in the classifier's names; the head a decoder base lacks goes last.
    shards: dict[str, list[str]] = {name: [] for name in base.checkpoint.shards}
    for target, source in base.source_of.items():
        shards[base.checkpoint.shard_of(source)].append(target)
    shards[list(shards)[-1]].extend(key for key in replacements if key not in base)

    def spec_of(key: str) -> TensorSpec:
        source = TensorSpec(replacements[key].dtype, tuple(replacements[key].shape)) if key in replacements else base.spec(key)
        expected = layout.parameters.get(key)
        if expected is not None and source.shape != expected.shape:
            where = f"{adapter.folder} (modules_to_save)" if key in replacements else str(base.checkpoint.folder)
            raise CheckpointError(f"{where}: {key} has shape {source.shape}; the classifier's config expects {expected.shape}")
        return TensorSpec(dtype if source.dtype.is_floating_point else source.dtype, source.shape)

    out_dir.mkdir(parents=True, exist_ok=True)
    single = len(shards) == 1
    weight_map, total = {}, 0
    for shard, keys in shards.items():
        name = _output_name(shard, single)
        specs = {key: spec_of(key) for key in keys}
        with SafetensorsWriter(out_dir / name, specs) as writer:
            for key in keys:
                if key in replacements:
                    pieces = [replacements[key]]
                elif key in updates:
                    pieces = [updates[key].merged(base.read(key))]
                else:
                    pieces = base.blocks(key)
                for piece in pieces:
                    writer.write(key, _finite(piece.to(specs[key].dtype), key))
                weight_map[key] = name
                total += specs[key].nbytes
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return MergedCheckpoint(merged_weights=len(updates), dropped=list(base.dropped))


def _finite(tensor: torch.Tensor, key: str) -> torch.Tensor:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteWeights(
            f"{key}: the merged tensor holds NaN or ±inf (a broken base or adapter, or a value beyond the range of {tensor.dtype})"
        )
    return tensor
