"""How far two float32 computations of one classifier may differ, derived from the arithmetic.

A served answer and the offline reference (transformers, eager attention, one document at a
time) compute the same model in the same precision, float32; they differ only in the order
they add things up. Padding a batch changes how a matmul is blocked, vLLM's CPU attention
sums keys in another order than eager attention, another CPU's kernels block differently.

Rounding errors of a float32 sum of n products behave as independent zero-mean variables
(Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
Comput. 41(5), 2019): its relative error stays below ``λ·sqrt(n)·u``, u = 2^-24, except with
a probability that falls like exp(-λ²/2). A forward pass runs R such reductions one after the
other (projections, attention scores, attention sums, norms, MLP, head), and independent
errors add in quadrature, so the logits of two summation orders differ by at most

    τ = λ · u · sqrt(n · R) · max|logit|        (n: the longest reduction)

with λ = 4. The bound is relative to the logits' own scale, so it holds for any model size
and any machine's rounding, and it stays orders of magnitude below what a real fault
changes: a bfloat16 computation errs by 2^-8 relative, a dropped softcap or a wrong token
by far more (tests/test_parity_bounds.py shows all three fail it).

Probabilities follow exactly: log p_i = z_i - logsumexp(z) moves by at most 2τ when every
logit moves by at most τ, so p_served / p_reference lies within e^(±2τ), widened by the few
roundings of a float32 softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
CONFIDENCE = 4.0  # λ: exp(-λ²/2) ≈ 3e-4 per reduction, before the quadrature sum averages errors further
# Sequential reductions per transformer layer: Q/K/V projections, attention scores, softmax
# sum, attention-weighted sum, output projection, up to four norms (Gemma-2), MLP in and out.
REDUCTIONS_PER_LAYER = 11
# Roundings of a float32 softmax after the logits: max, exp, sum, division (each ≤ u relative).
SOFTMAX_ROUNDINGS = 8


@dataclass(frozen=True)
class Float32Parity:
    longest_reduction: int  # n: terms in the longest dot product or sum
    sequential_reductions: int  # R

    @classmethod
    def for_model(cls, config, max_length: int) -> "Float32Parity":
        """From a transformers config: the widest of hidden size, MLP width and sequence length
        (attention sums over every position), and the reductions of all layers plus the head."""
        widths = [max_length, config.hidden_size, getattr(config, "intermediate_size", 0) or 0]
        return cls(max(widths), REDUCTIONS_PER_LAYER * config.num_hidden_layers + 2)

    @property
    def relative_logit_tolerance(self) -> float:
        return CONFIDENCE * FLOAT32_UNIT_ROUNDOFF * math.sqrt(self.longest_reduction * self.sequential_reductions)

    def logit_tolerance(self, reference_logits: np.ndarray) -> float:
        """τ for one document (or a batch: the largest scale among them)."""
        return self.relative_logit_tolerance * float(np.abs(reference_logits).max())

    def probability_tolerance(self, logit_scale: float, largest_probability: float = 1.0) -> float:
        """The largest |Δprobability| the bound allows, for logits of at most ``logit_scale``."""
        tau = self.relative_logit_tolerance * logit_scale
        return largest_probability * (math.expm1(2 * tau) + SOFTMAX_ROUNDINGS * FLOAT32_UNIT_ROUNDOFF)

    def logit_excess(self, reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
        """max |Δlogit| / τ per document, the largest over the rows: ≤ 1 means within the bound."""
        reference = np.atleast_2d(reference_logits).astype(np.float64)
        candidate = np.atleast_2d(candidate_logits).astype(np.float64)
        excess = [np.abs(c - r).max() / self.logit_tolerance(r) for r, c in zip(reference, candidate)]
        return float(max(excess))

    def probability_excess(self, reference_logits: np.ndarray, served: np.ndarray, classes=None) -> float:
        """How far served probabilities stray, as a share of what the bound allows (≤ 1: within).

        ``classes`` names the label indices ``served`` holds (a top-k answer); None: all of them."""
        logits = np.asarray(reference_logits, dtype=np.float64)
        expected = np.exp(logits - logits.max())
        expected /= expected.sum()
        if classes is not None:
            expected = expected[np.asarray(classes)]
        allowed = self.probability_tolerance(float(np.abs(logits).max()), expected)
        # A probability below float32's smallest normal number has no relative precision left.
        allowed = np.maximum(allowed, np.finfo(np.float32).tiny)
        return float((np.abs(np.asarray(served, dtype=np.float64) - expected) / allowed).max())


def assert_served_probabilities_match(parity: Float32Parity, reference_logits, served, classes=None) -> None:
    excess = parity.probability_excess(reference_logits, served, classes)
    assert excess <= 1.0, (
        f"served probabilities differ from the float32 reference by {excess:.2f}× the bound "
        f"(relative logit tolerance {parity.relative_logit_tolerance:.2e}; see tests/parity.py)"
    )


def probability_sum_slack(count: int) -> float:
    """A float32 sum of ``count`` probabilities, each rounded to float32 (≤ u relative) and added
    with ≤ u relative error per addition, exceeds 1 by at most about 2·count·u."""
    return 2 * count * FLOAT32_UNIT_ROUNDOFF


BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits


def bf16_relative_logit_bound(layers: int) -> float:
    """How far a bf16 forward pass's logits may stand from the exact ones, relative to their scale.
    Each of the model's 2L residual sublayers and its head rounds its inputs, its weights and its
    output to bf16 (three roundings of relative size u = 2^-8; the matmuls accumulate in float32,
    which adds nothing at this order): to first order 3(2L + 1)·u. Two bf16 computations of one
    model in different summation orders differ by at most twice that, as do logits centred on
    their mean."""
    return 3 * (2 * layers + 1) * BF16_UNIT_ROUNDOFF
