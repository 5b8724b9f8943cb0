"""Gemma-2 classification over packed batches: the PyTorch engine's forward pass on the CPU.

transformers runs a batch as a rectangle: every document padded to the longest, every position
through every layer, attention over the whole padded width. On a CPU that costs three ways
(profile: benchmarks/results/2026-11-30-precision.md): padding is computed like text, the eager
attention's score tensors of a padded batch outgrow the caches (a document cost more in a batch
of four than alone), and the classifier reads one token, yet the last layer runs every position.
Here, instead:

- documents are packed end to end in one sequence, with positions restarting at each document,
  so no padding is computed; attention runs document by document (a causal square per document,
  never across documents), so no score tensor is larger than one document's;
- the last layer computes its keys and values for every position (the pooled token attends to
  them) but its query, attention output, MLP, the final norm and the head for the pooled token
  of each document only;
- on the CPU, every projection multiplies with oneDNN on weights packed once into its blocked
  layout (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's CPU backend and vLLM's
  CPU backend use), much faster in float32 than torch's default matmul on this project's CPUs;
  the MLP's tanh GELU and its product with the up projection run inside those matmuls (oneDNN
  post-operations, on the float32 accumulator before it is rounded to the model's dtype)
  instead of as two more passes over the activations.

In bf16 the weights, the matmuls and the attention are bf16, but the residual stream, the norms,
the rotary embedding and the head stay in float32 (as llama.cpp keeps its activations):
transformers' bf16 forward rounds the stream to 8 bits after every sublayer, so the rounding
of 2L residual additions lands in the logits; it turns queries and keys by angles rounded to 8
bits; and its head writes the logits in bf16, where two classes closer than a bf16 step become
equal. Kept in float32, those roundings go and the answers stand nearer to the float32 model's (the export measures how near through this
forward: export/precision_agreement.py). In float32 nothing changes. In int8 the projections are
``core.quantized_linear.Int8Linear`` (int8 weights per channel, int8 activations per token) and
everything else computes in float32, attention included.

Everything else is transformers' own operations in its order (the norms' float32 arithmetic,
the rotary embedding, the eager attention's softcap, mask and float32 softmax, the tanh GELU;
attention's scale is applied to the queries rather than the scores), so in float32 the answers
are eager attention's within float rounding; the pooled token
is transformers' (the rightmost one that is not the pad token). Gemma-2's sliding window is
left out, so packing applies only when no document is longer than the window (``supports``).

Not compiled: torch.compile (inductor's CPU backend) of these element-wise steps and of the
per-document attention was exact enough but no faster here (profile in the results file above),
and would cost every server start its compilation.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from core.hf_classifier import serving_attention
from core.quantized_linear import QUANTIZED_LINEARS
from core.serving_config import ServingConfig


def supports(config, max_length: int) -> bool:
    """Whether ``PackedGemma2`` computes exactly what the model of ``config`` (a transformers config)
    does for documents up to ``max_length``."""
    window = getattr(config, "sliding_window", None)
    return (
        "Gemma2ForSequenceClassification" in (getattr(config, "architectures", None) or [])
        and not getattr(config, "use_bidirectional_attention", False)
        and getattr(config, "hidden_activation", None) == "gelu_pytorch_tanh"
        and (window is None or max_length <= window)
    )


def serves_packed(serving: ServingConfig, model_config, device: torch.device) -> bool:
    """Whether the PyTorch engine computes the model of ``model_config`` with ``PackedGemma2`` when
    serving ``serving`` on ``device``: on the CPU, where attention is eager, unless packing is off."""
    return (
        serving.engine == "torch"
        and serving.packing == "auto"
        and device.type == "cpu"
        and serving_attention(model_config, device, serving.attention) == "eager"
        and supports(model_config, serving.max_length)
    )


# A matmul library picks its kernel, and with it the order of summation, by the number of rows:
# a document's answer would change in the last bits with the documents it shares a batch with.
# So every product runs at row counts whose kernels give each row the same bits whatever the
# count: the pooled tokens in blocks of exactly ROW_BLOCK rows (torch's matmul), the tokens in at
# least ROW_BLOCK + 1 rows (oneDNN's packed matmul, whose kernels on AVX-512 CPUs gave the same
# bits at every row count tried above 16, in float32 and bf16), a shorter batch padded with zero
# rows up to that. Another CPU's kernels may not: the tests hold answers to the summation-order
# bound (tests/parity.py), not to the bits.
ROW_BLOCK = 16


def _zero_padded(rows: torch.Tensor, count: int) -> torch.Tensor:
    block = rows.new_zeros(count, rows.shape[1])
    block[: rows.shape[0]] = rows
    return block


def pooled_product(linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """``linear(rows)`` computed in zero-padded blocks of exactly ``ROW_BLOCK`` rows."""
    return torch.cat([linear(_zero_padded(block, ROW_BLOCK))[: len(block)] for block in rows.split(ROW_BLOCK)])


def gelu_tanh(rows: torch.Tensor) -> torch.Tensor:
    """Gemma-2's MLP activation (hidden_activation gelu_pytorch_tanh)."""
    return torch.nn.functional.gelu(rows, approximate="tanh")


class TorchProjection:
    """A linear layer through torch's matmul: on a device without oneDNN, and (``pooled``) for the
    pooled rows, one per document, in the fixed-size blocks of ``pooled_product``."""

    def __init__(self, linear: nn.Linear, pooled: bool = False):
        self.linear = linear
        self.pooled = pooled

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return pooled_product(self.linear, rows) if self.pooled else self.linear(rows)

    def gelu(self, rows: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(self(rows))

    def times(self, rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self(rows) * other


class OneDNNProjection:
    """A linear layer whose weight is packed once into oneDNN's blocked layout, for the products
    over every token; ``gelu`` and ``times`` fuse the MLP's steps after it into the matmul."""

    def __init__(self, linear: nn.Linear, rows_hint: int):
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)

    def __call__(self, rows: torch.Tensor, activation: str = "none", algorithm: str = "") -> torch.Tensor:
        count = rows.shape[0]
        if count <= ROW_BLOCK:
            return self(_zero_padded(rows, ROW_BLOCK + 1), activation, algorithm)[:count]
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, activation, [], algorithm)

    def gelu(self, rows: torch.Tensor) -> torch.Tensor:
        return self(rows, "gelu", "tanh")

    def times(self, rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(rows) * other``."""
        count = rows.shape[0]
        if count <= ROW_BLOCK:
            return self.times(_zero_padded(rows, ROW_BLOCK + 1), _zero_padded(other, ROW_BLOCK + 1))[:count]
        return torch.ops.mkldnn._linear_pointwise.binary(rows, other, self.packed, self.bias, "mul")


def _oneDNN_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = OneDNNProjection(nn.Linear(16, 16, bias=False, dtype=dtype), 16)
        rows = torch.zeros(ROW_BLOCK + 1, 16, dtype=dtype)
        probe.times(rows, probe.gelu(rows))
    except RuntimeError:  # a build or CPU without this dtype in oneDNN
        return False
    return True


def rms_normed(stream: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma2RMSNorm's arithmetic on float32 rows, scaled by (1 + weight) in float32."""
    return stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps) * weight_plus_one


def rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on (tokens, heads, head_dim), cos/sin (tokens, head_dim):
    computed in cos's dtype (float32), times ``scale``, returned in the states'."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = states.shape[-1] // 2
    rotated_half = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    turned = (states * cos) + (rotated_half * sin)
    return (turned * scale if scale != 1.0 else turned).to(states.dtype)


def query_scale(module: nn.Module) -> float:
    """What eager attention multiplies the scores by before its softcap's tanh, moved onto the
    queries (one multiplication in float32 before they are rounded, not two passes over the scores)."""
    softcap = module.attn_logit_softcapping
    return module.scaling / softcap if softcap is not None else module.scaling


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, softcap: float | None,
              mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' eager attention for one document: query (heads, q, head_dim), already times
    ``query_scale``; key and value (kv_heads, k, head_dim); ``mask`` added to the scores (None:
    every key is visible). The query heads that share a key head multiply it as one matrix, so no
    key or value is copied per head; softmax in bf16 computes in float32 inside, like eager's, and
    rounds once."""
    kv_heads, rows, head_dim = key.shape[0], query.shape[1], query.shape[2]
    scores = torch.matmul(query.reshape(kv_heads, -1, head_dim), key.transpose(1, 2))  # (kv_heads, groups × q, k)
    by_query_row = scores.view(kv_heads, -1, rows, scores.shape[-1])  # (kv_heads, groups, q, k)
    if softcap is not None:
        by_query_row = torch.tanh(by_query_row)
        by_query_row = by_query_row * softcap if mask is None else torch.add(mask, by_query_row, alpha=softcap)
    elif mask is not None:
        by_query_row = by_query_row + mask
    weights = torch.softmax(by_query_row, dim=-1).view(kv_heads, -1, scores.shape[-1])
    return torch.matmul(weights, value).view(-1, rows, head_dim)


# Query rows per step of causal attention: each step scores only the keys up to its last row.
CAUSAL_QUERY_BLOCK = 128


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     softcap: float | None) -> torch.Tensor:
    """``attention`` under the causal ``mask``, by blocks of query rows: a block's rows see no key
    past its last row, so the keys beyond it (masked: their softmax weight is exactly 0) are never
    scored. A 512-token document then scores 5/8 of the square instead of all of it."""
    if query.shape[1] <= CAUSAL_QUERY_BLOCK:
        return attention(query, key, value, softcap, mask)
    blocks = []
    for first in range(0, query.shape[1], CAUSAL_QUERY_BLOCK):
        last = min(first + CAUSAL_QUERY_BLOCK, query.shape[1])
        blocks.append(attention(query[:, first:last], key[:, :last], value[:, :last], softcap, mask[first:last, :last]))
    return torch.cat(blocks, dim=1)


class PackedGemma2:
    """Forward passes of a loaded ``Gemma2ForSequenceClassification`` over packed documents."""

    def __init__(self, model: nn.Module, rows_hint: int = 512):
        self.model = model
        self.config = model.config
        self.layers = list(model.model.layers[: model.config.num_hidden_layers])
        parameter = next(model.parameters())  # the embedding: with quantized layers, what the rest computes in
        self.dtype, self.device = parameter.dtype, parameter.device
        packs = self.device.type == "cpu" and _oneDNN_available(self.dtype)
        self._tokens, self._pooled = {}, {}
        for layer in self.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                if isinstance(linear, QUANTIZED_LINEARS):
                    # Each row quantized on its own and multiplied in exact integers: its answer is
                    # the same in any batch, so no fixed-size blocks are needed.
                    self._tokens[linear] = self._pooled[linear] = linear
                else:
                    self._tokens[linear] = OneDNNProjection(linear, rows_hint) if packs else TorchProjection(linear)
                    self._pooled[linear] = TorchProjection(linear, pooled=True)
        # The float32 parts (the module docstring): the norms' (1 + weight) and the head.
        self._norm_scale = {norm: 1.0 + norm.weight.detach().float() for norm in self._norms()}
        head = model.score if self.dtype == torch.float32 else copy.deepcopy(model.score).float()
        self._head = TorchProjection(head, pooled=True)
        self._masks: dict[int, torch.Tensor] = {}
        self.pad_token_id = self.config.pad_token_id
        self.eps = self.config.rms_norm_eps

    def _norms(self) -> list[nn.Module]:
        norms = [self.model.model.norm]
        for layer in self.layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                      layer.post_feedforward_layernorm]
        return norms

    def _normed(self, stream: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """A norm before a sublayer: the float32 stream normed, rounded to the matmuls' dtype."""
        return rms_normed(stream, self._norm_scale[norm], self.eps).to(self.dtype)

    def _add_normed(self, stream: torch.Tensor, update: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Gemma-2's residual step: the sublayer's output normed (its post-norm), added to the float32 stream."""
        return stream + rms_normed(update.float(), self._norm_scale[norm], self.eps)

    def _causal_mask(self, length: int) -> torch.Tensor:
        """What eager attention adds: 0 on and below the diagonal, the dtype's minimum above it."""
        longest = max(self._masks, default=0)
        if length > longest:
            size = max(length, 2 * longest)
            blocked = torch.ones(size, size, dtype=torch.bool, device=self.device).triu(1)
            self._masks = {size: torch.zeros(size, size, dtype=self.dtype, device=self.device).masked_fill(
                blocked, torch.finfo(self.dtype).min)}
            longest = size
        return self._masks[longest][:length, :length]

    @torch.inference_mode()
    def logits(self, documents: Sequence[Sequence[int]]) -> torch.Tensor:
        """Class logits in float32, shape (documents, labels)."""
        lengths = [len(ids) for ids in documents]
        token_ids = torch.tensor([token for ids in documents for token in ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(length, device=self.device) for length in lengths])
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        pooled = [start + self._pooled_position(ids) for start, ids in zip(starts, documents)]
        spans = list(zip(starts, lengths, pooled))

        base = self.model.model
        stream = base.embed_tokens(token_ids).float()  # (tokens, hidden); Gemma-2 scales inside its embedding
        cos, sin = base.rotary_emb(stream, positions[None])  # float32: cast to the stream's dtype
        cos, sin = cos[0], sin[0]
        for layer in self.layers[:-1]:
            stream = self._layer(layer, stream, cos, sin, spans)
        pooled_rows = torch.tensor(pooled, device=self.device)
        stream = self._layer(self.layers[-1], stream, cos, sin, spans, pooled_rows)
        return self._head(rms_normed(stream, self._norm_scale[base.norm], self.eps))

    def _pooled_position(self, ids: Sequence[int]) -> int:
        # transformers' pooling: the rightmost token that is not the pad token (the first if all are).
        if self.pad_token_id is None:
            return len(ids) - 1
        return next((index for index in range(len(ids) - 1, -1, -1) if ids[index] != self.pad_token_id), 0)

    def _heads(self, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
        return rows.view(rows.shape[0], -1, head_dim)

    def _self_attention(self, module: nn.Module, normed: torch.Tensor, cos, sin, spans,
                        pooled_rows: torch.Tensor | None) -> torch.Tensor:
        head_dim, softcap, scale = module.head_dim, module.attn_logit_softcapping, query_scale(module)
        key = rotary(self._heads(self._tokens[module.k_proj](normed), head_dim), cos, sin).transpose(0, 1)
        value = self._heads(self._tokens[module.v_proj](normed), head_dim).transpose(0, 1)
        if pooled_rows is not None:
            rows = pooled_rows
            query = rotary(self._heads(self._pooled[module.q_proj](normed[rows]), head_dim), cos[rows], sin[rows], scale)
            query = query.transpose(0, 1)
            # The pooled token attends to its document up to itself: every key it is given, no mask.
            outputs = [attention(query[:, index : index + 1], key[:, start : position + 1], value[:, start : position + 1],
                                 softcap, mask=None)
                       for index, (start, _, position) in enumerate(spans)]
        else:
            query = rotary(self._heads(self._tokens[module.q_proj](normed), head_dim), cos, sin, scale).transpose(0, 1)
            outputs = [causal_attention(query[:, start : start + length], key[:, start : start + length],
                                        value[:, start : start + length], self._causal_mask(length), softcap)
                       for start, length, _ in spans]
        merged = torch.cat([output.transpose(0, 1) for output in outputs]).reshape(-1, module.config.num_attention_heads * head_dim)
        return (self._tokens if pooled_rows is None else self._pooled)[module.o_proj](merged)

    def _mlp(self, mlp: nn.Module, rows: torch.Tensor, pooled: bool) -> torch.Tensor:
        projections = self._pooled if pooled else self._tokens
        activated = projections[mlp.up_proj].times(rows, projections[mlp.gate_proj].gelu(rows))
        return projections[mlp.down_proj](activated)

    def _layer(self, layer: nn.Module, stream: torch.Tensor, cos, sin, spans,
               pooled_rows: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder layer on the float32 stream; with ``pooled_rows`` (the last layer: each
        document's pooled token) only those tokens leave the model, so only they go on past attention."""
        attended = self._self_attention(layer.self_attn, self._normed(stream, layer.input_layernorm), cos, sin, spans,
                                        pooled_rows)
        if pooled_rows is not None:
            stream = stream[pooled_rows]
        stream = self._add_normed(stream, attended, layer.post_attention_layernorm)
        update = self._mlp(layer.mlp, self._normed(stream, layer.pre_feedforward_layernorm), pooled_rows is not None)
        return self._add_normed(stream, update, layer.post_feedforward_layernorm)
