"""Gemma-2's attention softcap: why the reference runs eager attention and what a server may run."""
import numpy as np
import pytest
import torch
from transformers import AutoConfig, BertConfig, BertForSequenceClassification, Gemma2ForSequenceClassification

from core import causal_flex_attention
from core.hf_classifier import encode_texts, load_tokenizer, pad_batch, serving_attention
from core.synthetic_patents import synthetic_patents
from tests.parity import Float32Parity, bf16_relative_logit_bound

pytestmark = pytest.mark.model  # tiny models and the exported demo, in torch


def softcapped_model(merged_dir, attention: str):
    """The demo Gemma-2 with attention logits well past the 50.0 cap, as in trained Gemma-2."""
    if attention == causal_flex_attention.NAME:
        causal_flex_attention.register()
    model = Gemma2ForSequenceClassification.from_pretrained(merged_dir, attn_implementation=attention).eval()
    with torch.inference_mode():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    return model


def softcapped_logits(merged_dir, attention: str, input_ids, attention_mask) -> np.ndarray:
    with torch.inference_mode():
        return softcapped_model(merged_dir, attention)(input_ids=input_ids, attention_mask=attention_mask).logits.numpy()


@pytest.fixture(scope="module")
def mixed_length_batch(exported):
    """Right-padded patents of different lengths, some cut at 512: padding inside the batch."""
    tokenizer = load_tokenizer(exported.merged_dir)
    encoded = encode_texts(tokenizer, [d.render() for d in synthetic_patents(6, seed=3, long_share=0.5)], 512)
    assert len({len(e.token_ids) for e in encoded}) > 3
    return pad_batch([e.token_ids for e in encoded], 0, torch.device("cpu"))


def test_sdpa_changes_a_softcapped_models_answers_and_eager_does_not(exported, mixed_length_batch):
    eager = softcapped_logits(exported.merged_dir, "eager", *mixed_length_batch)
    sdpa = softcapped_logits(exported.merged_dir, "sdpa", *mixed_length_batch)
    assert np.abs(eager - sdpa).max() > 1e-2


def test_causal_flex_attention_keeps_the_softcap_and_ignores_right_padding_exactly(exported, mixed_length_batch):
    # Compiled FlexAttention with no padding mask at all: exact because padding sits right of
    # every real token and attention is causal (core/causal_flex_attention.py).
    eager = softcapped_logits(exported.merged_dir, "eager", *mixed_length_batch)
    flex = softcapped_logits(exported.merged_dir, causal_flex_attention.NAME, *mixed_length_batch)
    parity = Float32Parity.for_model(AutoConfig.from_pretrained(exported.merged_dir), 512)
    assert parity.logit_excess(eager, flex) <= 1.0
    assert (eager.argmax(-1) == flex.argmax(-1)).all()


def test_causal_flex_attention_refuses_a_bidirectional_encoder():
    causal_flex_attention.register()
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32)
    config._attn_implementation = causal_flex_attention.NAME
    model = BertForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="exact only for causal"):
        model(input_ids=torch.ones((1, 8), dtype=torch.long))


def test_servers_pick_an_exact_attention_per_device(exported):
    gemma2 = AutoConfig.from_pretrained(exported.merged_dir)
    assert serving_attention(gemma2, torch.device("cpu")) == "eager"
    assert serving_attention(gemma2, torch.device("cuda")) == causal_flex_attention.NAME
    assert serving_attention(BertConfig(), torch.device("cuda")) == "sdpa"
    assert serving_attention(gemma2, torch.device("cpu"), "sdpa") == "sdpa"  # an operator's explicit choice stands


def test_packed_batches_keep_the_softcap_and_compute_what_padded_eager_attention_does(exported, mixed_length_batch):
    """Documents packed end to end, attention per document, the last layer for the pooled token
    only (core/packed_decoder.py), against transformers' eager attention over the padded batch:
    the same float32 arithmetic in another order, so within tests/parity.py's bound. A packed
    forward that dropped the softcap fails it."""
    from core.packed_decoder import PackedGemma2

    input_ids, attention_mask = mixed_length_batch
    documents = [ids[: int(mask.sum())].tolist() for ids, mask in zip(input_ids, attention_mask)]
    model = softcapped_model(exported.merged_dir, "eager")
    with torch.inference_mode():
        eager = model(input_ids=input_ids, attention_mask=attention_mask).logits.numpy()
    packed = PackedGemma2(model).logits(documents).numpy()
    parity = Float32Parity.for_model(model.config, 512)
    assert parity.logit_excess(eager, packed) <= 1.0
    assert (eager.argmax(-1) == packed.argmax(-1)).all()
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert parity.logit_excess(eager, PackedGemma2(model).logits(documents).numpy()) > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_documents_answer_does_not_depend_on_its_batch_mates(exported, dtype):
    """Alone, in pairs, or among 20 others (more pooled rows than one block), a five-token patent
    included: the same answer within what another summation order may change (tests/parity.py:
    float32's bound, or twice bf16's first-order error), far below what attention across
    documents would. The matmuls run at row counts whose kernels keep each row's bits where a
    CPU's kernels allow (core/packed_decoder.py), so on most CPUs the answers are bit for bit."""
    from core.hf_classifier import load_sequence_classifier
    from core.packed_decoder import PackedGemma2

    tokenizer = load_tokenizer(exported.merged_dir)
    documents = [e.token_ids for e in encode_texts(tokenizer, [d.render() for d in synthetic_patents(20, seed=3, long_share=0.3)], 512)]
    documents.append(documents[0][:5])
    model = load_sequence_classifier(exported.merged_dir, dtype)
    packed = PackedGemma2(model)
    alone = torch.cat([packed.logits([ids]) for ids in documents]).float().numpy()
    together = packed.logits(documents).float().numpy()
    in_pairs = torch.cat([packed.logits(documents[i : i + 2]) for i in range(0, len(documents), 2)]).float().numpy()
    if dtype == torch.float32:
        parity = Float32Parity.for_model(model.config, 512)
        assert parity.logit_excess(alone, together) <= 1.0 and parity.logit_excess(alone, in_pairs) <= 1.0
    else:
        relative = 2 * bf16_relative_logit_bound(model.config.num_hidden_layers)
        for batched in (together, in_pairs):
            assert all(np.abs(b - a).max() <= relative * np.abs(a).max() for a, b in zip(alone, batched))


def test_packed_bf16_keeps_its_stream_in_float32_and_stands_nearer_to_float32_than_transformers_bf16(exported):
    """The packed forward's bf16 rounds the matmuls' inputs and outputs but not the residual stream,
    the rotary embedding or the logits (core/packed_decoder.py): fewer roundings than transformers'
    bf16 forward, so its answers stand nearer to the float32 model's, and its logits come out in
    float32 rather than rounded to bf16's steps. The float32 reference computes with the bf16
    weights, so only the arithmetic's rounding is compared, not the weights' (the same in both)."""
    from core.hf_classifier import classifier_logits, load_sequence_classifier
    from core.packed_decoder import PackedGemma2

    tokenizer = load_tokenizer(exported.merged_dir)
    documents = [e.token_ids for e in encode_texts(tokenizer, [d.render() for d in synthetic_patents(24, seed=5)], 512)]
    float32 = PackedGemma2(load_sequence_classifier(exported.merged_dir, torch.bfloat16).float()).logits(documents).numpy()
    model = load_sequence_classifier(exported.merged_dir, torch.bfloat16)
    packed = PackedGemma2(model).logits(documents)
    assert packed.dtype == torch.float32
    with torch.inference_mode():
        transformers_bf16 = torch.cat([classifier_logits(model, *pad_batch([ids], model.config.pad_token_id, torch.device("cpu")))
                                       for ids in documents]).float().numpy()
    packed_error, transformers_error = np.abs(packed.numpy() - float32).mean(), np.abs(transformers_bf16 - float32).mean()
    assert packed_error < transformers_error, f"mean |Δlogit|: packed {packed_error:.3g}, transformers {transformers_error:.3g}"
