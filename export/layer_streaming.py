"""Run a classifier whose weights do not fit in memory, loading each layer as the forward pass reaches it.

The model is the real transformers class (``classifier_layout.empty_classifier``: weights on
``meta``, buffers real), so masks, rotary embeddings, softcapping and last-token pooling are the
library's own. Its weights come from a ``WeightSource`` in three ways:
- each element of the model's layer lists (``model.layers[i]`` for Gemma-2 and Llama,
  ``encoder.layer[i]`` for BERT and ELECTRA) is loaded just before it runs and released after;
- an embedding table reads only the rows of the tokens in the batch (256,000 rows for Gemma-2;
  a proof's patents use a few thousand);
- everything else (final norm, classification head) stays loaded throughout.
With an adapter the model is PEFT's (``PeftModel``), LoRA unmerged: PEFT's own LoRA layers
compute base(x) + scale·B(A(x)) around each streamed base weight, and the adapter's tensors
stay loaded. Memory then holds the adapter, the always-loaded part, one layer and the batch's
activations. Every document batch reads every layer again, so a pass takes up to
``STREAMED_BATCH`` documents.
"""
from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from core.hf_classifier import class_logits
from export.checkpoint_files import CheckpointError
from export.classifier_layout import empty_classifier
from export.lora_adapter import SAVED_PREFIX, LoraAdapter
from export.streamed_merge import WeightSource

STREAMED_BATCH = 16


def _source_key(parameter_name: str) -> str | None:
    """The classifier's name for a parameter of the (possibly PEFT-wrapped) model; None for the
    copy of a head that ``modules_to_save`` replaces (never run)."""
    if ".original_module." in parameter_name:
        return None
    return parameter_name.removeprefix(SAVED_PREFIX).replace(".base_layer.", ".")


class LayerStreamedClassifier:
    def __init__(
        self, config: PretrainedConfig, weights: WeightSource, device: str | torch.device = "cpu",
        adapter: LoraAdapter | None = None, stream: bool = True, dtype: torch.dtype = torch.float32,
    ):
        """``dtype``: what the weights are computed in (the precision report runs bf16 this way too)."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights = weights
        self._padding_idx: dict[int, int | None] = {}
        model = empty_classifier(config)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter.folder, low_cpu_mem_usage=True).eval()
            self._load_adapter(model, adapter)
        self.model = model
        # Meta parameters by owning module: (module, attribute, classifier's name).
        self._owned: dict[int, list[tuple[torch.nn.Module, str, str]]] = {}
        for module_name, module in model.named_modules():
            for attribute, parameter in module.named_parameters(recurse=False):
                key = _source_key(f"{module_name}.{attribute}")
                if parameter.is_meta and key is not None:
                    if key not in weights:
                        raise CheckpointError(f"the weights have no {key}, which the model's {module_name}.{attribute} needs")
                    self._owned.setdefault(id(module), []).append((module, attribute, key))
        self.layers = self._layer_units(model) if stream else []
        layer_modules = {id(sub) for layer in self.layers for sub in layer.modules()}
        self.embeddings = [
            module for module in model.modules()
            if stream and isinstance(module, torch.nn.Embedding) and id(module) not in layer_modules and id(module) in self._owned
        ]
        streamed = layer_modules | {id(module) for module in self.embeddings}
        for module_id, owned in self._owned.items():
            if module_id not in streamed:
                self._load(owned)
        for layer in self.layers:
            layer.register_forward_pre_hook(lambda module, args: self._load(self._owned_within(module)))
            layer.register_forward_hook(lambda module, args, output: self._release(self._owned_within(module)))
        for embedding in self.embeddings:
            embedding.register_forward_pre_hook(self._load_rows)
            embedding.register_forward_hook(self._release_rows)

    @staticmethod
    def _layer_units(model: torch.nn.Module) -> list[torch.nn.Module]:
        units = [layer for module in model.modules() if isinstance(module, torch.nn.ModuleList) for layer in module]
        inner = {id(sub) for unit in units for sub in list(unit.modules())[1:]}
        return [unit for unit in units if id(unit) not in inner]

    def _load_adapter(self, model: PeftModel, adapter: LoraAdapter) -> None:
        """PEFT's low-memory load leaves the LoRA matrices on the base layers' device, here
        ``meta``: assign them from the adapter instead."""
        values = {}
        for key, update in adapter.updates.items():
            module = SAVED_PREFIX + key.removesuffix(".weight")
            values[f"{module}.lora_A.default.weight"] = update.a.float()
            values[f"{module}.lora_B.default.weight"] = update.b.float()
        for key, tensor in adapter.replacements.items():
            module, _, leaf = key.rpartition(".")
            values[f"{SAVED_PREFIX}{module}.modules_to_save.default.{leaf}"] = tensor.float()
        # strict=False: a tensor with no LoRA module to go to (adapter_config.json's target_modules
        # leaves out a module its weights carry) is not run by PEFT, the reference, so not here
        # either; the merge, which merges every update the weights carry, then fails the proof.
        model.load_state_dict({k: v.to(self.device) for k, v in values.items()}, strict=False, assign=True)

    def _owned_within(self, module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
        return [entry for sub in module.modules() for entry in self._owned.get(id(sub), [])]

    def _load(self, owned) -> None:
        for module, attribute, key in owned:
            value = self.weights.read(key).to(self.device, self.dtype)
            module._parameters[attribute] = torch.nn.Parameter(value, requires_grad=False)

    def _release(self, owned) -> None:
        for module, attribute, _ in owned:
            shape = module._parameters[attribute].shape
            module._parameters[attribute] = torch.nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)

    def _load_rows(self, embedding: torch.nn.Embedding, args):
        """Load the rows of the ids in this batch, and renumber the ids into them."""
        (ids, *rest) = args
        rows, renumbered = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        (module, attribute, key), = self._owned[id(embedding)]
        table = self.weights.read_rows(key, rows).to(self.device, self.dtype)
        module._parameters[attribute] = torch.nn.Parameter(table, requires_grad=False)
        # padding_idx only affects gradients, but F.embedding checks it against the table's size.
        self._padding_idx[id(embedding)] = embedding.padding_idx
        embedding.padding_idx = None
        return (renumbered.to(ids.device), *rest)

    def _release_rows(self, embedding: torch.nn.Embedding, args, output) -> None:
        self._release(self._owned[id(embedding)])
        embedding.padding_idx = self._padding_idx.pop(id(embedding))

    def logits(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> np.ndarray:
        return class_logits(self.model, tokenizer, texts, max_length, batch_size=STREAMED_BATCH, device=self.device)


def streamed_memory_bytes(config: PretrainedConfig, adapter: LoraAdapter | None, embedding_rows: int) -> int:
    """Weights held at once by a layer-streamed pass (float32): the always-loaded part, the
    adapter, the largest layer and ``embedding_rows`` rows of each embedding table."""
    model = empty_classifier(config)
    layers = LayerStreamedClassifier._layer_units(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and id(m.weight) not in in_layers]
    embedding_ids = {id(m.weight) for m in embeddings}
    always = sum(p.numel() for p in model.parameters() if id(p) not in in_layers and id(p) not in embedding_ids)
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    rows = sum(min(embedding_rows, m.num_embeddings) * m.embedding_dim for m in embeddings)
    return 4 * (always + largest + rows) + (adapter.nbytes if adapter is not None else 0)
