"""Gemma-2's attention softcap: why the reference runs eager attention and what a server may run."""
import numpy as np
import torch
from transformers import AutoConfig, BertConfig, Gemma2ForSequenceClassification

from core.hf_classifier import encode_texts, load_tokenizer, pad_batch, serving_attention
from core.synthetic_patents import synthetic_patents


def test_sdpa_changes_a_softcapped_models_answers_and_eager_does_not(exported):
    tokenizer = load_tokenizer(exported.merged_dir)
    encoded = encode_texts(tokenizer, [d.render() for d in synthetic_patents(4, seed=3)], 512)
    input_ids, attention_mask = pad_batch([e.token_ids for e in encoded], 0, torch.device("cpu"))
    logits = {}
    for attention in ("eager", "sdpa"):
        model = Gemma2ForSequenceClassification.from_pretrained(exported.merged_dir, attn_implementation=attention).eval()
        with torch.no_grad():
            for layer in model.model.layers:  # attention logits well past the 50.0 cap, as in trained Gemma-2
                layer.self_attn.q_proj.weight.mul_(40.0)
                layer.self_attn.k_proj.weight.mul_(40.0)
            logits[attention] = model(input_ids=input_ids, attention_mask=attention_mask).logits.numpy()
    assert np.abs(logits["eager"] - logits["sdpa"]).max() > 1e-2


def test_servers_pick_an_exact_attention_per_device(exported):
    gemma2 = AutoConfig.from_pretrained(exported.merged_dir)
    assert serving_attention(gemma2, torch.device("cpu")) == "eager"
    assert serving_attention(gemma2, torch.device("cuda")) == "flex_attention"
    assert serving_attention(BertConfig(), torch.device("cuda")) == "sdpa"
    assert serving_attention(gemma2, torch.device("cpu"), "sdpa") == "sdpa"  # an operator's explicit choice stands
