"""Gemma-2's softcapped attention as one fused FlexAttention kernel, compiled once for every
batch size and width: the server's fast exact path on the GPU.

Why not transformers' own ``flex_attention``: it builds a new padding-aware mask function and
``BlockMask`` on every forward pass, and the compiled kernel guards on those functions' identity.
Measured on the CPU (tiny Gemma-2, transformers 5.19, torch 2.13): eight shapes made it
recompile until dynamo's limit of 8, after which it silently runs FlexAttention uncompiled,
materialising every score matrix. A server meeting new batch shapes all day cannot live with
either.

Why no padding mask is needed: the engine pads on the right, and attention is causal, so a real
token only ever attends to positions at or before itself, all of them real; the classifier pools
the last real token. Padding rows compute values nobody reads. So the mask is the pure causal
(or causal sliding-window) pattern of the width alone: one ``BlockMask`` per width, cached, and
mask and score functions that are the same Python objects on every call, which keeps the
compiled kernel's guards stable. The softcap reaches the kernel as a captured tensor (a captured
Python float fails inductor's lowering with dynamic shapes: "unbacked_bindings").
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

NAME = "causal_flex"


@functools.cache
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=True: batch size and width are symbols, so a handful of compilations (dynamo still
    # specialises sizes 0 and 1) serve every batch the scheduler forms.
    return torch.compile(flex_attention, dynamic=True)


def _causal(batch, head, query, key):
    return query >= key


@functools.cache
def _causal_window(window: int) -> Callable:
    def causal_within_window(batch, head, query, key):
        return (query >= key) & (query - key < window)

    return causal_within_window


@functools.cache
def _block_mask(width: int, window: int | None, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = _causal if window is None or window >= width else _causal_window(window)
    return create_block_mask(mask, None, None, width, width, device=device)


@functools.cache
def _softcap_score(softcap: float, device: torch.device) -> Callable:
    cap = torch.tensor(softcap, dtype=torch.float32, device=device)

    def softcapped(score, batch, head, query, key):
        return cap * torch.tanh(score / cap)

    return softcapped


def causal_flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, width, head_dim) in,
    (batch, width, heads, head_dim) out, no attention weights."""
    if not getattr(module, "is_causal", False):
        raise ValueError(
            f"attention {NAME!r} is exact only for causal (decoder) models with right padding; "
            f"{type(module).__name__} is not causal: use attention 'sdpa' or 'eager'"
        )
    if dropout:
        raise ValueError(f"attention {NAME!r} is for inference: dropout must be 0")
    width = query.shape[2]
    if key.shape[2] != width:
        raise ValueError(f"attention {NAME!r} runs whole documents (no KV cache): {width} queries, {key.shape[2]} keys")
    output = _compiled_flex_attention()(
        query,
        key,
        value,
        score_mod=_softcap_score(float(softcap), query.device) if softcap else None,
        block_mask=_block_mask(width, sliding_window, query.device),
        enable_gqa=query.shape[1] != key.shape[1],
        scale=scaling,
    )
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation="causal_flex"`` loadable; idempotent. transformers then skips
    building masks for it (it is not among its mask interfaces), so the function gets None."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_flex_attention_forward)
    return NAME


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process: flat after warm-up, or something recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
