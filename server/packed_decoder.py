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
  CPU backend use), much faster in float32 than torch's default matmul on this project's CPUs.

Everything else is transformers' own operations in its order (the norms' float32 arithmetic,
the rotary embedding, the eager attention's scale, softcap, mask and float32 softmax, the tanh
GELU), so the answers are eager attention's within float rounding; the pooled token is
transformers' (the rightmost one that is not the pad token). Gemma-2's sliding window is left
out, so packing applies only when no document is longer than the window (``supports``).

Not compiled: torch.compile (inductor's CPU backend) of these element-wise steps and of the
per-document attention was exact enough but no faster here (profile in the results file above),
and would cost every server start its compilation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


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


class PackedLinear:
    """``linear``'s weight packed once into oneDNN's blocked layout, for the products over every token."""

    def __init__(self, linear: nn.Linear, rows_hint: int):
        self.linear = linear
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.shape[0]
        if count <= ROW_BLOCK:
            return self(_zero_padded(rows, ROW_BLOCK + 1))[:count]
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.linear.bias, "none", [], "")


def _oneDNN_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 16)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(16, 16, dtype=dtype), probe, None, "none", [], "")
    except RuntimeError:  # a build or CPU without this dtype in oneDNN
        return False
    return True


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma2RMSNorm: in float32, scaled by (1 + weight), back to the input's dtype."""
    normed = hidden.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).type_as(hidden)


def add_rms_normed(hidden: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma-2's residual step: the sublayer's output normed (its post-norm), added to the stream."""
    return hidden + rms_norm(update, weight, eps)


def rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on (tokens, heads, head_dim), cos/sin (tokens, head_dim)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = states.shape[-1] // 2
    rotated_half = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return (states * cos) + (rotated_half * sin)


def gelu_tanh_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gemma-2's MLP between its projections (hidden_activation gelu_pytorch_tanh)."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, scaling: float,
              softcap: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' eager attention for one document: query (heads, q, head_dim), key and value
    (kv_heads, k, head_dim), ``mask`` added to the scores (None: every key is visible)."""
    if groups > 1:
        key = key.repeat_interleave(groups, dim=0)
        value = value.repeat_interleave(groups, dim=0)
    scores = torch.matmul(query, key.transpose(1, 2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


# Query rows per step of causal attention: each step scores only the keys up to its last row.
CAUSAL_QUERY_BLOCK = 128


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     groups: int, scaling: float, softcap: float | None) -> torch.Tensor:
    """``attention`` under the causal ``mask``, by blocks of query rows: a block's rows see no key
    past its last row, so the keys beyond it (masked: their softmax weight is exactly 0) are never
    scored. A 512-token document then scores 5/8 of the square instead of all of it."""
    if query.shape[1] <= CAUSAL_QUERY_BLOCK:
        return attention(query, key, value, groups, scaling, softcap, mask)
    blocks = []
    for first in range(0, query.shape[1], CAUSAL_QUERY_BLOCK):
        last = min(first + CAUSAL_QUERY_BLOCK, query.shape[1])
        blocks.append(attention(query[:, first:last], key[:, :last], value[:, :last], groups, scaling, softcap,
                                mask[first:last, :last]))
    return torch.cat(blocks, dim=1)


class PackedGemma2:
    """Forward passes of a loaded ``Gemma2ForSequenceClassification`` over packed documents."""

    def __init__(self, model: nn.Module, rows_hint: int = 512):
        self.model = model
        self.config = model.config
        self.layers = list(model.model.layers[: model.config.num_hidden_layers])
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        pack = self.device.type == "cpu" and _oneDNN_available(self.dtype)
        self._linear = {}
        for layer in self.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                self._linear[linear] = PackedLinear(linear, rows_hint) if pack else linear
        self._masks: dict[int, torch.Tensor] = {}
        self.pad_token_id = self.config.pad_token_id
        self.eps = self.config.rms_norm_eps

    def _project(self, linear: nn.Linear, rows: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """``linear`` over token rows, or (``pooled``) over one pooled row per document."""
        return pooled_product(linear, rows) if pooled else self._linear[linear](rows)

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
        """Class logits, shape (documents, labels), in the model's dtype."""
        lengths = [len(ids) for ids in documents]
        token_ids = torch.tensor([token for ids in documents for token in ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(length, device=self.device) for length in lengths])
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        pooled = [start + self._pooled_position(ids) for start, ids in zip(starts, documents)]
        spans = list(zip(starts, lengths, pooled))

        base = self.model.model
        hidden = base.embed_tokens(token_ids)  # (tokens, hidden); Gemma-2 scales inside its embedding
        cos, sin = base.rotary_emb(hidden, positions[None])
        cos, sin = cos[0], sin[0]
        for layer in self.layers[:-1]:
            hidden = self._layer(layer, hidden, cos, sin, spans)
        hidden = self._last_layer(self.layers[-1], hidden, cos, sin, spans)
        return self._project(self.model.score, rms_norm(hidden, base.norm.weight, self.eps), pooled=True)

    def _pooled_position(self, ids: Sequence[int]) -> int:
        # transformers' pooling: the rightmost token that is not the pad token (the first if all are).
        if self.pad_token_id is None:
            return len(ids) - 1
        return next((index for index in range(len(ids) - 1, -1, -1) if ids[index] != self.pad_token_id), 0)

    def _heads(self, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
        return rows.view(rows.shape[0], -1, head_dim)

    def _self_attention(self, module: nn.Module, normed: torch.Tensor, cos, sin, spans, pooled_only: bool) -> torch.Tensor:
        head_dim = module.head_dim
        settings = dict(groups=module.num_key_value_groups, scaling=module.scaling, softcap=module.attn_logit_softcapping)
        key = rotary(self._heads(self._project(module.k_proj, normed), head_dim), cos, sin).transpose(0, 1)
        value = self._heads(self._project(module.v_proj, normed), head_dim).transpose(0, 1)
        if pooled_only:
            rows = torch.tensor([pooled for _, _, pooled in spans], device=normed.device)
            query = rotary(self._heads(self._project(module.q_proj, normed[rows], pooled=True), head_dim), cos[rows], sin[rows])
            query = query.transpose(0, 1)
            # The pooled token attends to its document up to itself: every key it is given, no mask.
            outputs = [attention(query[:, index : index + 1], key[:, start : position + 1], value[:, start : position + 1],
                              mask=None, **settings)
                       for index, (start, _, position) in enumerate(spans)]
        else:
            query = rotary(self._heads(self._project(module.q_proj, normed), head_dim), cos, sin).transpose(0, 1)
            outputs = [causal_attention(query[:, start : start + length], key[:, start : start + length],
                                        value[:, start : start + length], self._causal_mask(length), **settings)
                       for start, length, _ in spans]
        merged = torch.cat([output.transpose(0, 1) for output in outputs]).reshape(-1, module.config.num_attention_heads * head_dim)
        return self._project(module.o_proj, merged, pooled_only)

    def _mlp(self, mlp: nn.Module, rows: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        gate, up = self._project(mlp.gate_proj, rows, pooled), self._project(mlp.up_proj, rows, pooled)
        return self._project(mlp.down_proj, gelu_tanh_gated(gate, up), pooled)

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, cos, sin, spans, pooled_only: bool = False) -> torch.Tensor:
        """One decoder layer; ``pooled_only`` (the last layer): only the pooled token of each document
        leaves the model, so only it goes on past attention."""
        normed = rms_norm(hidden, layer.input_layernorm.weight, self.eps)
        attended = self._self_attention(layer.self_attn, normed, cos, sin, spans, pooled_only)
        if pooled_only:
            hidden = hidden[torch.tensor([pooled for _, _, pooled in spans], device=hidden.device)]
        hidden = add_rms_normed(hidden, attended, layer.post_attention_layernorm.weight, self.eps)
        update = self._mlp(layer.mlp, rms_norm(hidden, layer.pre_feedforward_layernorm.weight, self.eps), pooled_only)
        return add_rms_normed(hidden, update, layer.post_feedforward_layernorm.weight, self.eps)

    def _last_layer(self, layer: nn.Module, hidden: torch.Tensor, cos, sin, spans) -> torch.Tensor:
        return self._layer(layer, hidden, cos, sin, spans, pooled_only=True)
