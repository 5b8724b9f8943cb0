"""Gemma-2's attention softcap: why the reference runs eager attention and what a server may run."""
import numpy as np
import pytest
import torch
from transformers import AutoConfig, BertConfig, BertForSequenceClassification, Gemma2ForSequenceClassification

from core import causal_flex_attention
from core.hf_classifier import encode_texts, load_tokenizer, pad_batch, serving_attention
from core.synthetic_patents import synthetic_patents
from tests.parity import Float32Parity

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
    only (server/packed_decoder.py), against transformers' eager attention over the padded batch:
    the same float32 arithmetic in another order, so within tests/parity.py's bound. A packed
    forward that dropped the softcap fails it."""
    from server.packed_decoder import PackedGemma2

    input_ids, attention_mask = mixed_length_batch
    documents = [ids[: int(mask.sum())].tolist() for ids, mask in zip(input_ids, attention_mask)]
    eager = softcapped_logits(exported.merged_dir, "eager", input_ids, attention_mask)
    model = softcapped_model(exported.merged_dir, "eager")
    packed = PackedGemma2(model).logits(documents).numpy()
    parity = Float32Parity.for_model(model.config, 512)
    assert parity.logit_excess(eager, packed) <= 1.0
    assert (eager.argmax(-1) == packed.argmax(-1)).all()
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert parity.logit_excess(eager, PackedGemma2(model).logits(documents).numpy()) > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_documents_answer_does_not_depend_on_its_batch_mates(exported, dtype):
    """Bit for bit: alone, in pairs, or among 20 others (more pooled rows than one block), a
    five-token patent included; the matmul kernels run at row counts that keep each row's bits."""
    from core.hf_classifier import load_sequence_classifier
    from server.packed_decoder import PackedGemma2

    tokenizer = load_tokenizer(exported.merged_dir)
    documents = [e.token_ids for e in encode_texts(tokenizer, [d.render() for d in synthetic_patents(20, seed=3, long_share=0.3)], 512)]
    documents.append(documents[0][:5])
    packed = PackedGemma2(load_sequence_classifier(exported.merged_dir, dtype))
    alone = torch.cat([packed.logits([ids]) for ids in documents])
    assert torch.equal(alone, packed.logits(documents))
    assert torch.equal(alone, torch.cat([packed.logits(documents[i : i + 2]) for i in range(0, len(documents), 2)]))
