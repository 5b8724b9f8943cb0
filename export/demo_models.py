"""Tiny stand-ins for the office's models, built without any download.

``build_gemma2_demo`` writes what a real LoRA fine-tune of google/gemma-2-9b leaves behind,
at toy size: a base model folder (``Gemma2ForSequenceClassification`` from the real
``Gemma2Config``, attention softcapping at 50.0 as in Gemma-2-9b, head_dim 32 because vLLM's
CPU attention needs at least that), a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, the ``score`` head in ``modules_to_save``) and a Korean
tokenizer trained here on generated patents. ``build_llama_demo`` writes the same for a
``LlamaForSequenceClassification`` over 9 IPC classes (the second architecture the engines
must serve identically). Everything is seeded: the same call writes the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from core.labels import LabelSet
from core.synthetic_patents import korean_prose, synthetic_patents

KSCST_LABELS_FILE = Path(__file__).parent / "labels" / "kscst.tsv"
IPC_LABELS_FILE = Path(__file__).parent / "labels" / "ipc9.tsv"

# Gemma's own special-token layout: pad 0, eos 1, bos 2, unk 3.
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


@dataclass(frozen=True)
class DemoModelPaths:
    base: Path
    adapter: Path
    labels: Path


def train_patent_tokenizer(vocab_size: int = 8000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer (like Gemma's) trained on generated Korean patents."""
    documents = synthetic_patents(600, seed=seed, long_share=0.5)
    corpus = [document.render() for document in documents] + list(korean_prose())
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIAL_TOKENS, show_progress=False)
    )
    bos_id = tokenizer.token_to_id("<bos>")
    # Gemma prepends <bos> and appends nothing; sequence classification pools the last real token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def _tiny_decoder_settings(vocab_size: int, labels: LabelSet) -> dict:
    """What both toy decoders share: their size, Gemma's special-token ids, the labels."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention takes head sizes of 32 and up
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        num_labels=len(labels),
        id2label=labels.id2label(),
        label2id={code: index for index, code in labels.id2label().items()},
    )


def tiny_gemma2_config(vocab_size: int, labels: LabelSet) -> Gemma2Config:
    return Gemma2Config(
        **_tiny_decoder_settings(vocab_size, labels),
        query_pre_attn_scalar=32,
        attn_logit_softcapping=50.0,  # as Gemma-2-9b: the reason the reference must run eager attention
        final_logit_softcapping=30.0,
        sliding_window=4096,
        max_position_embeddings=8192,
    )


def tiny_llama_config(vocab_size: int, labels: LabelSet) -> LlamaConfig:
    return LlamaConfig(**_tiny_decoder_settings(vocab_size, labels), max_position_embeddings=2048)


def build_gemma2_demo(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/gemma2-base``, ``out_dir/gemma2-kscst-lora`` and return their paths."""
    paths = DemoModelPaths(out_dir / "gemma2-base", out_dir / "gemma2-kscst-lora", KSCST_LABELS_FILE)
    _build_lora_fine_tune(Gemma2ForSequenceClassification, tiny_gemma2_config, paths, seed)
    return paths


def build_llama_demo(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/llama-base``, ``out_dir/llama-ipc-lora`` (9 IPC classes) and return their paths."""
    paths = DemoModelPaths(out_dir / "llama-base", out_dir / "llama-ipc-lora", IPC_LABELS_FILE)
    _build_lora_fine_tune(LlamaForSequenceClassification, tiny_llama_config, paths, seed)
    return paths


def _build_lora_fine_tune(
    model_class: type[PreTrainedModel],
    make_config: Callable[[int, LabelSet], PretrainedConfig],
    paths: DemoModelPaths,
    seed: int,
) -> None:
    """A random base classifier and a LoRA adapter over it, saved as a real fine-tune saves them."""
    from peft import LoraConfig, get_peft_model

    labels = LabelSet.read_tsv(paths.labels)
    tokenizer = train_patent_tokenizer(seed=seed)

    torch.manual_seed(seed)
    base = model_class(make_config(len(tokenizer), labels)).eval()
    base.save_pretrained(paths.base)
    tokenizer.save_pretrained(paths.base)

    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["score"],
    )
    # Fine-tune from the saved folder, as a real run does from the hub, so the adapter records its base.
    base = model_class.from_pretrained(paths.base, dtype=torch.float32)
    fine_tune = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in fine_tune.named_parameters():
            if "lora_B" in name:
                # PEFT starts B at zero (the adapter is a no-op until trained); a trained one is not.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name and "score" in name:
                # A trained head separates the classes; random 0.02-scale weights barely would.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    fine_tune.save_pretrained(paths.adapter)
    tokenizer.save_pretrained(paths.adapter)  # as transformers' Trainer does beside the adapter
