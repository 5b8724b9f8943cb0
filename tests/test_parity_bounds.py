"""The float32 parity bound (tests/parity.py) every served-answer test uses: wide enough for
another summation order, tight enough that the faults it exists to catch fail it."""
import copy

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForSequenceClassification

from core.hf_classifier import pad_batch
from tests.parity import Float32Parity, probability_sum_slack

pytestmark = pytest.mark.model  # tiny Gemma-2 models in torch

MAX_LENGTH = 96
LENGTHS = (96, 80, 57, 31, 12)


@pytest.fixture(scope="module")
def softcapped_gemma2():
    """A tiny Gemma-2 whose attention logits go well past the 50.0 cap, as trained Gemma-2's do,
    so that the cap changes the answer (random small weights would never reach it)."""
    torch.manual_seed(7)
    config = Gemma2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, num_labels=24, pad_token_id=0,
    )
    model = Gemma2ForSequenceClassification(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    generator = torch.Generator().manual_seed(11)
    documents = [torch.randint(1, 512, (length,), generator=generator).tolist() for length in LENGTHS]
    return model, documents


def logits(model, documents, attention="eager", dtype=torch.float32, batched=False) -> np.ndarray:
    # A copy: casting to bfloat16 and back would round the shared model's weights for good.
    model = copy.deepcopy(model).to(dtype)
    model.config._attn_implementation = attention
    with torch.inference_mode():
        groups = [documents] if batched else [[document] for document in documents]
        rows = [model(*pad_batch(group, 0, torch.device("cpu"))).logits.float().numpy() for group in groups]
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def parity(softcapped_gemma2) -> Float32Parity:
    return Float32Parity.for_model(softcapped_gemma2[0].config, MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(softcapped_gemma2) -> np.ndarray:
    return logits(*softcapped_gemma2)


def test_another_summation_order_in_float32_stays_within_the_bound(softcapped_gemma2, parity, reference):
    # One right-padded batch instead of one document at a time: what our engine does.
    assert parity.logit_excess(reference, logits(*softcapped_gemma2, batched=True)) <= 1.0


def test_a_dropped_softcap_fails_the_bound(softcapped_gemma2, parity, reference):
    # transformers' SDPA path for Gemma-2 skips attn_logit_softcapping.
    assert parity.logit_excess(reference, logits(*softcapped_gemma2, attention="sdpa")) > 1.0


def test_bfloat16_served_as_float32_fails_the_bound(softcapped_gemma2, parity, reference):
    assert parity.logit_excess(reference, logits(*softcapped_gemma2, dtype=torch.bfloat16)) > 1.0


def test_a_wrong_token_fails_the_bound(softcapped_gemma2, parity, reference):
    model, documents = softcapped_gemma2
    changed = [list(document) for document in documents]
    for document in changed:
        document[len(document) // 2] = document[len(document) // 2] % 511 + 1
    assert parity.logit_excess(reference, logits(model, changed)) > 1.0


def test_probabilities_are_held_to_the_same_bound(softcapped_gemma2, parity, reference):
    expected = torch.softmax(torch.as_tensor(reference), dim=-1).numpy()
    shifted = logits(*softcapped_gemma2, batched=True)
    served = torch.softmax(torch.as_tensor(shifted), dim=-1).numpy()
    assert max(parity.probability_excess(r, s) for r, s in zip(reference, served)) <= 1.0
    wrong = logits(*softcapped_gemma2, attention="sdpa")
    served_wrong = torch.softmax(torch.as_tensor(wrong), dim=-1).numpy()
    assert max(parity.probability_excess(r, s) for r, s in zip(reference, served_wrong)) > 1.0
    # A top-k answer is checked on the classes it names.
    top = np.argsort(-expected[0])[:5]
    assert parity.probability_excess(reference[0], served[0][top], classes=top) <= 1.0
    assert served.sum(axis=1).max() <= 1 + probability_sum_slack(served.shape[1])
