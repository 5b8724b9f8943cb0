"""Loading and running a Hugging Face ``*ForSequenceClassification`` model the one right way,
for the export's merge proof, the PyTorch engine and the tests' offline reference.

Imports torch: only server-side code uses this module, never the client library.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from core import causal_flex_attention
from core.engine import padded_width
from core.quantized_linear import INT_MM, cpu_has_any, quantize_linears
from core.text_preprocessing import Preprocessing, text_preprocessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def exact_attention(config) -> str:
    """The attention implementation that computes what the model was trained with.

    Gemma-2 caps attention logits (``attn_logit_softcapping``); transformers' SDPA path
    silently skips the cap and changes the answer, so such models run eager attention.
    """
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def serving_attention(config, device: torch.device, requested: str = "auto") -> str:
    """The attention a server runs: ``requested``, or for ``auto`` the fastest exact one here.

    For softcapped causal models (Gemma-2) on the GPU that is ``causal_flex``
    (``core.causal_flex_attention``): one compiled FlexAttention kernel that applies the cap.
    On the CPU its compilation costs tens of seconds per shape family and a 2-core CPU gains
    little from fusion, so the CPU keeps eager attention. Other models take SDPA.
    """
    if requested != "auto":
        return requested
    if exact_attention(config) == "eager":
        causal = not getattr(config, "use_bidirectional_attention", False)
        return causal_flex_attention.NAME if device.type == "cuda" and causal else "eager"
    return "sdpa"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# CPU features with bf16 dot-product instructions (/proc/cpuinfo and torch's spelling): there a
# bf16 matmul runs at several times float32's rate; elsewhere bf16 is emulated and slower.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as detected at start,
    never assumed: torch's CPU feature probe, else the kernel's /proc/cpuinfo flags."""
    return cpu_has_any(NATIVE_BF16_CPU_FEATURES)


def device_name(device: torch.device) -> str:
    """"cpu", or an accelerator with its index ("cuda:1"). Without an index torch means the current
    device, 0 unless the process selected another; asking torch would initialize CUDA in this
    process, which must not happen before vLLM starts its workers."""
    return device.type if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling of the serving field ``dtype``."""
    return str(dtype).removeprefix("torch.")


def load_sequence_classifier(
    model_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention: str | None = None,
    quantization: str | None = None,
    int8_product=INT_MM,
    **overrides,
):
    """``attention`` defaults to the exact reference implementation (``exact_attention``).

    ``quantization`` (``int8``, ``fp8``): every linear layer but the head quantized
    (``core.quantized_linear``), the rest in ``dtype``. The layers are quantized from the weights as
    saved (bf16 files load as bf16, never rounded again), one at a time, so memory peaks near the
    saved size, not float32's; ``int8_product`` is the int8 product they use."""
    config = AutoConfig.from_pretrained(model_dir, **overrides)
    if attention == causal_flex_attention.NAME:
        causal_flex_attention.register()
    device = torch.device(device)
    saved = getattr(config, "dtype", None)
    load_dtype = saved if quantization == "int8" and saved in (torch.bfloat16, torch.float16) else dtype
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, config=config, dtype=load_dtype, attn_implementation=attention or exact_attention(config),
        # Straight onto the GPU: otherwise a 9B model first passes through host memory, 4 bytes a parameter.
        device_map=str(device) if device.type == "cuda" else None,
    )
    model = model.to(device).eval()
    if quantization is not None:
        quantize_linears(model, quantization, int8_product)
        # What stays unquantized, in dtype; fp8 loads in it already (a float cast would touch fp8 weights too).
        if load_dtype != dtype:
            model.to(dtype)
    return model


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Pooling takes the last non-pad token, so padding must go on the right of real tokens.
    tokenizer.padding_side = "right"
    return tokenizer


@dataclass(frozen=True)
class EncodedText:
    token_ids: list[int]
    truncated: bool


class TruncatingTokenizer:
    """A fast tokenizer's Rust tokenizer, cutting at ``max_length`` tokens (special tokens
    included, on the tokenizer's truncation side) and saying which texts it cut: the token ids
    ``tokenizer(texts, truncation=True, max_length=max_length)`` gives; callable from any thread.

    A text is tokenized whole without special tokens (its length, in Rust, says whether it is cut),
    then truncated and given its special tokens by the tokenizer's own post-processing, as
    transformers does. Asking transformers for the overflowing tokens instead, to see the cut,
    turns the rest of a long text into rows of Python ints (a 256 KB text into hundreds): what an
    overloaded server must not pay. The Rust tokenizer is a private copy: transformers resets the
    truncation of its own on every call."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_padding()
        self._backend.no_truncation()
        self._truncation = dict(max_length=max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
        self._special_tokens = self._backend.num_special_tokens_to_add(False)
        self._lock = threading.Lock()  # encode switches the copy's truncation on and off

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        with self._lock:
            whole = self._backend.encode_batch(list(texts), add_special_tokens=False)
            self._backend.enable_truncation(**self._truncation)
            try:
                return [
                    EncodedText(self._backend.post_process(encoding).ids, len(encoding) + self._special_tokens > self.max_length)
                    for encoding in whole
                ]
            finally:
                self._backend.no_truncation()


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[EncodedText]:
    """Tokenize with truncation at ``max_length`` and say which texts were cut (``TruncatingTokenizer``)."""
    return TruncatingTokenizer(tokenizer, max_length).encode(texts)


class DocumentEncoder:
    """One model's text cleaning, then its tokenizer truncating at its max length
    (``TruncatingTokenizer``); callable from any thread.

    Every engine encodes through it, so all of them clean, truncate and count tokens the same way."""

    def __init__(self, model_dir: Path, max_length: int, preprocessing: Preprocessing = "none"):
        self.tokenizer = load_tokenizer(model_dir)
        self.max_length = max_length
        self.preprocess = text_preprocessor(preprocessing)
        self._truncating = TruncatingTokenizer(self.tokenizer, max_length)

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        if self.preprocess is not None:
            texts = [self.preprocess(text) for text in texts]
        return self._truncating.encode(texts)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device, multiple_of: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for one forward pass.

    ``multiple_of`` rounds the width up (``padded_width``): on a GPU to widths tensor cores
    handle whole (16)."""
    width = padded_width(max(len(ids) for ids in sequences), multiple_of)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


@functools.cache
def _takes_token_type_ids(model_class: type) -> bool:
    # Asked once per class, not on every forward pass of the engine.
    return "token_type_ids" in inspect.signature(model_class.forward).parameters


def classifier_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One forward pass. Encoders with segment embeddings (BERT, ELECTRA) get ``token_type_ids``
    explicitly: a document is one segment, type 0, padding included, as their tokenizers emit."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _takes_token_type_ids(type(model)):
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
    return model(**inputs).logits


@torch.inference_mode()
def class_logits(
    model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 8, device: torch.device | None = None
) -> np.ndarray:
    """Logits in float32, shape (len(texts), num_labels): the offline reference. ``device``: where
    the inputs go; by default the model's first parameter's."""
    device = device or next(model.parameters()).device
    encoded = encode_texts(tokenizer, texts, max_length)
    rows = []
    for start in range(0, len(encoded), batch_size):
        chunk = [item.token_ids for item in encoded[start : start + batch_size]]
        input_ids, attention_mask = pad_batch(chunk, model.config.pad_token_id, device)
        rows.append(classifier_logits(model, input_ids, attention_mask).float().cpu().numpy())
    return np.concatenate(rows)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
