"""What the export checks before it spends minutes on a model: can this server serve it?

Any Hugging Face ``*ForSequenceClassification`` folder is served, with these stated exceptions,
each refused at export with its reason:
- the folder holds another head (``*ForCausalLM``, ``*ForTokenClassification``, ...);
- ``problem_type: multi_label_classification``: its classes are independent sigmoids, while
  this server answers with one softmax over the classes and a top-k;
- a ``max_length`` beyond the model's position embeddings (KcBERT-base has 300).
Which architectures the vLLM engine runs is vLLM's decision (it adapts decoders to
classification at load time); a model it cannot run fails its Triton model load with vLLM's
message, not at export.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

log = logging.getLogger(__name__)


class UnsupportedModel(ValueError):
    pass


def check_servable(model_dir: Path, max_length: int, adapter_dir: Path | None = None) -> PretrainedConfig:
    """The model's config, if this server can serve it; ``UnsupportedModel`` naming the reason if not.

    With an adapter, ``model_dir`` is the adapter's base, whose saved head may be another one
    (google/gemma-2-9b is a ``Gemma2ForCausalLM``): the adapter must then be a sequence-
    classification LoRA, whose merge gives the classifier."""
    if not (Path(model_dir) / "config.json").exists():
        raise UnsupportedModel(f"{model_dir}: no config.json, so not a Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = list(getattr(config, "architectures", None) or [])
    if adapter_dir is not None:
        _check_classification_adapter(Path(adapter_dir))
    elif not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise UnsupportedModel(
            f"{model_dir}: architecture {architectures or 'unknown'} is not a *ForSequenceClassification; this "
            "server classifies whole documents, so export the fine-tuned sequence classifier, not this head"
        )
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UnsupportedModel(f"{model_dir}: transformers has no sequence classifier for model_type {config.model_type!r}")
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise UnsupportedModel(
            f"{model_dir}: problem_type is multi_label_classification (independent sigmoid per class); this server "
            "answers single-label classification (softmax over the classes, top-k)"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise UnsupportedModel(
            f"{model_dir}: max_length {max_length} exceeds the model's max_position_embeddings {positions}; "
            f"set serving.max_length to at most {positions}"
        )
    return config


def _check_classification_adapter(adapter_dir: Path) -> None:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise UnsupportedModel(f"{adapter_dir}: no adapter_config.json, so not a PEFT adapter folder")
    task_type = json.loads(config_file.read_text(encoding="utf-8")).get("task_type")
    if task_type != "SEQ_CLS":
        raise UnsupportedModel(
            f"{adapter_dir}: the adapter's task_type is {task_type!r}, not 'SEQ_CLS'; only a sequence-classification "
            "LoRA merges into a classifier"
        )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, source: Path) -> None:
    """Give a tokenizer without a pad token (Llama-3's) its end-of-text token as pad, as fine-tuning
    scripts do, and record it in the config: decoder classifiers pool the last token that is not
    padding, and batching needs padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UnsupportedModel(f"{source}: the tokenizer has neither a pad token nor an end-of-text token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("%s: no pad token; padding with the end-of-text token %r", source, tokenizer.eos_token)
    tokenizer.padding_side = "right"
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
