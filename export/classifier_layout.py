"""The tensors a ``*ForSequenceClassification`` expects, and where each comes from in a base checkpoint.

The classifier is built on PyTorch's ``meta`` device (no memory for weights; buffers such as
rotary frequencies stay real, as the forward pass needs them), so its parameter names and
shapes are known for a 9B model at no cost. A base checkpoint's tensor maps onto it:
- under the same name (a sequence-classification checkpoint, or a ``*ForCausalLM``: both
  keep the backbone under the same prefix, ``model.`` for Gemma-2 and Llama);
- under the backbone prefix (a bare ``Gemma2Model``/``BertModel`` checkpoint);
- nowhere: another head's tensors (``lm_head``, BERT's ``cls.predictions``, ELECTRA's
  ``discriminator_predictions``) are dropped and listed in the merge report.
The classification head a decoder base lacks comes from the adapter's ``modules_to_save``.
"""
from __future__ import annotations

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForSequenceClassification, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from core.hf_classifier import exact_attention
from export.checkpoint_files import TensorSpec


def sequence_classifier_architecture(config: PretrainedConfig) -> str:
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config.model_type]


def empty_classifier(config: PretrainedConfig) -> torch.nn.Module:
    """The classifier with its parameters on ``meta`` and its buffers real, float32, in the
    exact attention implementation (``core.hf_classifier.exact_attention``)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForSequenceClassification.from_config(
            config, attn_implementation=exact_attention(config), dtype=torch.float32
        )
    return model.eval()


class ClassifierLayout:
    def __init__(self, config: PretrainedConfig):
        model = empty_classifier(config)
        self.prefix = model.base_model_prefix
        # named_parameters() names a tied parameter once: the checkpoint needs it once.
        self.parameters = {name: TensorSpec(torch.float32, tuple(p.shape)) for name, p in model.named_parameters()}
        self.state_keys = set(model.state_dict())

    def target_of(self, source_key: str) -> str | None:
        """The classifier's name for a base checkpoint's tensor; None: the classifier has no place for it."""
        if source_key in self.state_keys:
            return source_key
        prefixed = f"{self.prefix}.{source_key}"
        return prefixed if prefixed in self.state_keys else None

    def float32_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.parameters.values())
