"""A PEFT LoRA adapter folder as the merge needs it: each targeted weight's low-rank update
and scale, and the modules the fine-tune trained whole (``modules_to_save``: the classifier head).

The merged weight is PEFT's (``peft/tuners/lora/layer.py``, ``Linear.get_delta_weight`` and
``merge``): W + scale·(B·A), transposed when ``fan_in_fan_out``, with scale = lora_alpha / r,
or lora_alpha / √r with ``use_rslora``; r and alpha per module from ``rank_pattern`` and
``alpha_pattern`` as PEFT matches them. It is computed in float32 whatever the files' dtype.

Adapters whose merge is something else are refused, naming the setting: DoRA (a learned
magnitude rescales each merged column), LoRA biases, LoRA on embeddings, aLoRA (active only
after its invocation tokens: no merged weight computes that), trainable tokens, LoRA on bare
parameters, layer replication.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from export.checkpoint_files import SafetensorsShard, TorchBinShard
from export.model_support import UnsupportedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # PEFT before safetensors
# What PEFT puts before the base model's own parameter names when it saves an adapter.
SAVED_PREFIX = "base_model.model."
CLASSIFIER_HEADS = ("score", "classifier")

# adapter_config.json settings whose merge this export does not compute: refused when set.
_REFUSED_SETTINGS = {
    "use_dora": "DoRA rescales every merged column by a learned magnitude",
    "lora_bias": "LoRA biases add a trained bias to each targeted layer",
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens, which no merged weight computes",
    "trainable_token_indices": "trainable tokens replace rows of the embedding",
    "target_parameters": "LoRA on bare parameters (mixture-of-experts weights)",
    "layer_replication": "layer replication duplicates base layers",
    "use_qalora": "QA-LoRA pools its inputs by groups",
}


@dataclass(frozen=True)
class LoraUpdate:
    """The low-rank update of one weight: W + scale·(B·A)."""

    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scale: float
    fan_in_fan_out: bool

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight in float32, computed as PEFT's ``merge`` does (same operations,
        same order), so it equals ``merge_and_unload`` on a float32 model."""
        delta = self.b.float() @ self.a.float()
        if self.fan_in_fan_out:
            delta = delta.T
        return weight.float() + delta * self.scale


class LoraAdapter:
    """``updates`` by the base weight's name (``model.layers.0.self_attn.q_proj.weight``);
    ``replacements``: the tensors of ``modules_to_save``, by the name they take in the model."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config_file = self.folder / ADAPTER_CONFIG
        if not config_file.exists():
            raise UnsupportedModel(f"{self.folder}: no {ADAPTER_CONFIG}, so not a PEFT adapter folder")
        self.config = json.loads(config_file.read_text(encoding="utf-8"))
        self._refuse_unsupported()
        self.modules_to_save = list(dict.fromkeys(self.config.get("modules_to_save") or []))
        if not set(CLASSIFIER_HEADS) & set(self.modules_to_save):
            raise UnsupportedModel(
                f"{self.folder}: the adapter does not carry the classification head (modules_to_save="
                f"{self.config.get('modules_to_save')}); merged onto the base, the head would be the base's untrained one"
            )
        if (self.folder / ADAPTER_WEIGHTS).exists():
            weights = SafetensorsShard(self.folder / ADAPTER_WEIGHTS)
        elif (self.folder / ADAPTER_WEIGHTS_BIN).exists():
            weights = TorchBinShard(self.folder / ADAPTER_WEIGHTS_BIN)
        else:
            raise UnsupportedModel(f"{self.folder}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")
        self.updates: dict[str, LoraUpdate] = {}
        self.replacements: dict[str, torch.Tensor] = {}
        self._read(weights)

    def _refuse_unsupported(self) -> None:
        if self.config.get("peft_type") != "LORA":
            raise UnsupportedModel(f"{self.folder}: peft_type is {self.config.get('peft_type')!r}; the export merges LoRA adapters only")
        for setting, reason in _REFUSED_SETTINGS.items():
            if self.config.get(setting):
                raise UnsupportedModel(
                    f"{self.folder}: adapter_config.json sets {setting}={self.config[setting]!r}; the export does not "
                    f"merge that ({reason}): merge it with PEFT's merge_and_unload on a machine that holds the model, "
                    "and export the result as a full fine-tune (no adapter)"
                )

    def _read(self, weights: SafetensorsShard | TorchBinShard) -> None:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key in weights.specs:
            name = key.removeprefix(SAVED_PREFIX)
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module.endswith((".lora_A", ".lora_B")):
                module, _, which = module.rpartition(".")
                pairs.setdefault(module, {})[which] = weights.read(key)
            elif "lora_" in name:
                raise UnsupportedModel(f"{self.folder}: tensor {key} is a LoRA part the export does not merge")
            elif self._saved_whole(name):
                self.replacements[name.replace("modules_to_save.", "")] = weights.read(key)
            else:
                raise UnsupportedModel(
                    f"{self.folder}: tensor {key} is neither a LoRA matrix nor part of modules_to_save {self.modules_to_save}"
                )
        for module, parts in pairs.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise UnsupportedModel(f"{self.folder}: {module} has {sorted(parts)} but a LoRA update needs lora_A and lora_B")
            self.updates[f"{module}.weight"] = self._update(module, parts["lora_A"], parts["lora_B"])

    def _saved_whole(self, name: str) -> bool:
        module = name.rpartition(".")[0].replace(".modules_to_save", "")
        return any(module == saved or module.endswith(f".{saved}") for saved in self.modules_to_save)

    def _update(self, module: str, a: torch.Tensor, b: torch.Tensor) -> LoraUpdate:
        rank_pattern = self.config.get("rank_pattern") or {}
        alpha_pattern = self.config.get("alpha_pattern") or {}
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), self.config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), self.config["lora_alpha"])
        if a.shape[0] != r or b.shape[1] != r:
            raise UnsupportedModel(
                f"{self.folder}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not have the rank r={r} "
                "that adapter_config.json gives it"
            )
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return LoraUpdate(a, b, scale, bool(self.config.get("fan_in_fan_out")))

    @property
    def nbytes(self) -> int:
        tensors = [t for update in self.updates.values() for t in (update.a, update.b)] + list(self.replacements.values())
        return sum(t.numel() * t.element_size() for t in tensors)
