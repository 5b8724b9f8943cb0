"""Tiny stand-ins for the office's models, built without any download.

``build_gemma2_demo`` writes what a real LoRA fine-tune of google/gemma-2-9b leaves behind,
at toy size: a base model folder (``Gemma2ForSequenceClassification`` from the real
``Gemma2Config``, attention softcapping at 50.0 as in Gemma-2-9b, head_dim 32 because vLLM's
CPU attention needs at least that), a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, the ``score`` head in ``modules_to_save``) and a Korean
tokenizer trained here on generated patents. ``build_llama_demo`` writes the same for a
``LlamaForSequenceClassification`` over 9 IPC classes, with Llama-3's token layout: no pad
token in the base, the fine-tune's tokenizer padding with ``<|end_of_text|>`` as training
scripts set it. ``build_kcbert_demo`` and ``build_koelectra_demo`` write full fine-tunes (no
adapter) of a ``BertForSequenceClassification`` (KcBERT's shape: cased WordPiece, 300
positions) and an ``ElectraForSequenceClassification`` over 3 sentiment classes, with WordPiece
tokenizers trained here. Everything is seeded: the same call writes the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
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
SENTIMENT_LABELS_FILE = Path(__file__).parent / "labels" / "sentiment3.tsv"


@dataclass(frozen=True)
class DecoderTokens:
    """A decoder tokenizer's special tokens; ids follow the order of ``specials``."""

    bos: str
    eos: str
    unk: str
    pad: str | None  # Llama-3 ships none

    @property
    def specials(self) -> list[str]:
        return [token for token in (self.pad, self.eos, self.bos, self.unk) if token is not None]


GEMMA_TOKENS = DecoderTokens(bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>")  # pad 0, eos 1, bos 2, unk 3
LLAMA3_TOKENS = DecoderTokens(bos="<|begin_of_text|>", eos="<|end_of_text|>", unk="<unk>", pad=None)


@dataclass(frozen=True)
class DemoModelPaths:
    base: Path  # for a full fine-tune: the fine-tuned classifier itself
    adapter: Path | None  # the LoRA adapter; None for a full fine-tune
    labels: Path


def _training_corpus(seed: int) -> list[str]:
    documents = synthetic_patents(600, seed=seed, long_share=0.5)
    return [document.render() for document in documents] + list(korean_prose())


def train_patent_tokenizer(
    vocab_size: int = 8000, seed: int = 0, tokens: DecoderTokens = GEMMA_TOKENS
) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer (like Gemma's and Llama's) trained on generated Korean patents."""
    tokenizer = Tokenizer(models.BPE(unk_token=tokens.unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        _training_corpus(seed),
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tokens.specials, show_progress=False),
    )
    bos_id = tokenizer.token_to_id(tokens.bos)
    # Both prepend <bos> and append nothing; sequence classification pools the last real token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokens.bos} $A", pair=f"{tokens.bos} $A $B", special_tokens=[(tokens.bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=tokens.bos,
        eos_token=tokens.eos,
        pad_token=tokens.pad,
        unk_token=tokens.unk,
        padding_side="right",
    )


WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(vocab_size: int = 8000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A cased BERT WordPiece tokenizer (as KcBERT's and KoELECTRA's) trained on generated patents.

    No lowercasing and no accent stripping: BERT's accent stripping decomposes Hangul syllables
    into jamo (NFD), which Korean BERTs turn off."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        _training_corpus(seed),
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIAL_TOKENS, show_progress=False),
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _label_settings(labels: LabelSet) -> dict:
    return dict(
        num_labels=len(labels),
        id2label=labels.id2label(),
        label2id={code: index for index, code in labels.id2label().items()},
    )


def _tiny_decoder_settings(tokenizer: PreTrainedTokenizerFast, labels: LabelSet) -> dict:
    """What both toy decoders share: their size, the tokenizer's special-token ids, the labels."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention takes head sizes of 32 and up
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **_label_settings(labels),
    )


def _tiny_encoder_settings(tokenizer: PreTrainedTokenizerFast, labels: LabelSet) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 32, for vLLM's CPU attention
        intermediate_size=256,
        type_vocab_size=2,
        # Random weights at BERT's 0.02 give a [CLS] vector that barely depends on the text, so
        # every document would get the same answer; a wider init makes answers differ, as trained ones do.
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        **_label_settings(labels),
    )


def tiny_gemma2_config(tokenizer: PreTrainedTokenizerFast, labels: LabelSet, **size) -> Gemma2Config:
    """The demo Gemma-2; ``size`` overrides the toy's dimensions (``bench_gemma2_config``)."""
    return Gemma2Config(**{
        **_tiny_decoder_settings(tokenizer, labels),
        "query_pre_attn_scalar": 32,  # as Gemma-2-9b: the head size
        "attn_logit_softcapping": 50.0,  # as Gemma-2-9b: the reason the reference must run eager attention
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
        "max_position_embeddings": 8192,
        **size,
    })


def bench_gemma2_config(tokenizer: PreTrainedTokenizerFast, labels: LabelSet) -> Gemma2Config:
    """Gemma-2-9b's architecture and proportions (head size 128 against 9b's 256, 2 query heads per
    KV head, an MLP 4x the width, both softcaps, alternating sliding-window layers) at 6 layers of
    width 1024: 95 M parameters besides the embeddings, 97 GFLOP per 512-token patent. Enough
    work per token that `make bench` measures the CPU's arithmetic, where the 2-layer toy
    measures overhead, and little enough that a CPU measures it in minutes."""
    return tiny_gemma2_config(tokenizer, labels, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, labels: LabelSet) -> LlamaConfig:
    return LlamaConfig(**_tiny_decoder_settings(tokenizer, labels), max_position_embeddings=2048)


def tiny_kcbert_config(tokenizer: PreTrainedTokenizerFast, labels: LabelSet) -> BertConfig:
    return BertConfig(**_tiny_encoder_settings(tokenizer, labels), max_position_embeddings=300)  # as KcBERT-base


def tiny_koelectra_config(tokenizer: PreTrainedTokenizerFast, labels: LabelSet) -> ElectraConfig:
    return ElectraConfig(**_tiny_encoder_settings(tokenizer, labels), embedding_size=128, max_position_embeddings=512)


def build_gemma2_demo(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/gemma2-base``, ``out_dir/gemma2-kscst-lora`` and return their paths."""
    paths = DemoModelPaths(out_dir / "gemma2-base", out_dir / "gemma2-kscst-lora", KSCST_LABELS_FILE)
    _build_lora_fine_tune(Gemma2ForSequenceClassification, tiny_gemma2_config, GEMMA_TOKENS, paths, seed)
    return paths


def build_llama_demo(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/llama-base``, ``out_dir/llama-ipc-lora`` (9 IPC classes) and return their paths."""
    paths = DemoModelPaths(out_dir / "llama-base", out_dir / "llama-ipc-lora", IPC_LABELS_FILE)
    _build_lora_fine_tune(LlamaForSequenceClassification, tiny_llama_config, LLAMA3_TOKENS, paths, seed)
    return paths


def build_kcbert_demo(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/kcbert-ipc`` (a full fine-tune over the 9 IPC classes) and return its paths."""
    paths = DemoModelPaths(out_dir / "kcbert-ipc", None, IPC_LABELS_FILE)
    _build_full_fine_tune(BertForSequenceClassification, tiny_kcbert_config, paths, seed)
    return paths


def build_koelectra_demo(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/koelectra-sentiment`` (positive/negative/neutral) and return its paths."""
    paths = DemoModelPaths(out_dir / "koelectra-sentiment", None, SENTIMENT_LABELS_FILE)
    _build_full_fine_tune(ElectraForSequenceClassification, tiny_koelectra_config, paths, seed)
    return paths


def build_gemma2_bench(out_dir: Path, seed: int = 0) -> DemoModelPaths:
    """Write ``out_dir/gemma2-bench``: a ``Gemma2ForSequenceClassification`` over the 188 KSCST
    classes at ``bench_gemma2_config``'s size (a full fine-tune folder, float32, 0.4 GB)."""
    paths = DemoModelPaths(out_dir / "gemma2-bench", None, KSCST_LABELS_FILE)
    _build_full_fine_tune(Gemma2ForSequenceClassification, bench_gemma2_config, paths, seed, train_patent_tokenizer)
    return paths


DEMO_BUILDERS: dict[str, Callable[[Path, int], DemoModelPaths]] = {
    "gemma2": build_gemma2_demo,
    "llama": build_llama_demo,
    "kcbert": build_kcbert_demo,
    "koelectra": build_koelectra_demo,
}
# Built on request only (`make bench` builds it): not a stand-in for one of the office's models.
BENCH_BUILDERS: dict[str, Callable[[Path, int], DemoModelPaths]] = {"gemma2-bench": build_gemma2_bench}

MakeConfig = Callable[[PreTrainedTokenizerFast, LabelSet], PretrainedConfig]


def _build_full_fine_tune(
    model_class: type[PreTrainedModel], make_config: MakeConfig, paths: DemoModelPaths, seed: int,
    train_tokenizer: Callable[..., PreTrainedTokenizerFast] = train_wordpiece_tokenizer,
) -> None:
    """A classifier whose every weight was trained: one folder, model and tokenizer, as Trainer saves it."""
    labels = LabelSet.read_tsv(paths.labels)
    tokenizer = train_tokenizer(seed=seed)
    torch.manual_seed(seed)
    model = model_class(make_config(tokenizer, labels)).eval()
    head = model.classifier if hasattr(model, "classifier") else model.score  # encoders' name; decoders'
    with torch.no_grad():
        # A trained head separates the classes; random 0.02-scale weights barely would. Scaled by
        # fan-in so ELECTRA's two-layer head does not saturate the softmax to one class either.
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 2.0 / module.in_features**0.5)
    model.save_pretrained(paths.base)
    tokenizer.save_pretrained(paths.base)


def _build_lora_fine_tune(
    model_class: type[PreTrainedModel], make_config: MakeConfig, tokens: DecoderTokens, paths: DemoModelPaths, seed: int
) -> None:
    """A random base classifier and a LoRA adapter over it, saved as a real fine-tune saves them."""
    from peft import LoraConfig, get_peft_model

    labels = LabelSet.read_tsv(paths.labels)
    tokenizer = train_patent_tokenizer(seed=seed, tokens=tokens)

    torch.manual_seed(seed)
    base = model_class(make_config(tokenizer, labels)).eval()
    base.save_pretrained(paths.base)
    tokenizer.save_pretrained(paths.base)
    if tokenizer.pad_token is None:
        # What Llama fine-tuning scripts do before training a classifier in batches.
        tokenizer.pad_token = tokenizer.eos_token

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
