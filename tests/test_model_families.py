"""Every family the office runs, exported from one models file and served by one tritonserver:
Gemma-2 + LoRA, Llama + LoRA (9 IPC classes), KcBERT (its own text cleaning) and KoELECTRA
(3 classes, 60 tokens). Each must answer what transformers answers in float32 on the same
cleaned text."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from patent_classifier_client import PatentClassifier
from patent_classifier_client.feedback_protocol import FEEDBACK_MODEL
from core.models_file import ModelsFile, ModelsFileError
from core.synthetic_patents import synthetic_patents
from core.text_preprocessing import kcbert_clean
from tests.conftest import (
    KCBERT_MODEL,
    KOELECTRA_CPU_THREADS,
    KOELECTRA_MAX_LENGTH,
    KOELECTRA_MODEL,
    LLAMA_MODEL,
    MODEL_NAME,
    PROJECT_ROOT,
    OfflineReference,
)
from tests.test_monitoring import scrape, value
from tests.test_serving import example_documents, served_probabilities

FAMILIES = [MODEL_NAME, LLAMA_MODEL, KCBERT_MODEL, KOELECTRA_MODEL]
NOISY_COMMENT = "이 특허 진짜 대박 ㅋㅋㅋㅋㅋㅋ 😀😀 자세한 건 https://www.kipris.or.kr/khome/main.do?q=1 참고!!!! 漢字表記"


@pytest.fixture(scope="module")
def references(exported):
    return {name: OfflineReference.for_served_model(exported, name) for name in FAMILIES}


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_serves_what_transformers_computes(server, references, model, protocol):
    reference = references[model]
    texts = [document.render() for document in example_documents()] + [NOISY_COMMENT, "짧은 문장."]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with PatentClassifier(url, protocol=protocol, model=model) as client:
        answers = client.classify_batch(texts, top_k=len(reference.labels))
    top_probabilities = []
    for text, answer in zip(texts, answers):
        expected, token_count = reference.probabilities(text)
        reference.assert_matches(text, served_probabilities(answer, reference.labels))
        assert answer.labels[0].code == reference.labels.codes[int(expected.argmax())]
        assert answer.token_count == token_count
        top_probabilities.append(expected.max())
    # A saturated softmax (one class at ~1.0) would make any model look equal; these spread.
    assert min(top_probabilities) < 0.9


@pytest.mark.server
def test_koelectra_truncates_at_60_tokens_and_says_so(server, references):
    reference = references[KOELECTRA_MODEL]
    long_text, short_text = synthetic_patents(1, seed=3, long_share=1.0)[0].render(), "좋은 발명입니다."
    assert reference.untruncated_length(long_text) > KOELECTRA_MAX_LENGTH > reference.untruncated_length(short_text)
    with PatentClassifier(server.grpc_url, model=KOELECTRA_MODEL) as client:
        long_answer, short_answer = client.classify_batch([long_text, short_text])
    assert (long_answer.token_count, long_answer.truncated) == (KOELECTRA_MAX_LENGTH, True)
    assert (short_answer.token_count, short_answer.truncated) == (reference.untruncated_length(short_text), False)
    assert {score.code for score in long_answer.labels} == {"positive", "negative", "neutral"}


def test_kcbert_cleaning_follows_its_authors():
    cleaned = kcbert_clean(NOISY_COMMENT)
    assert "kipris" not in cleaned and "https" not in cleaned  # URL removed
    assert "ㅋㅋ" in cleaned and "ㅋㅋㅋ" not in cleaned  # repeats squeezed to two
    assert "😀" in cleaned  # emoji kept, as KcBERT was pretrained
    assert "漢" not in cleaned  # outside Hangul/ASCII/emoji: filtered
    assert "😀" not in kcbert_clean(NOISY_COMMENT, keep_emoji=False)


@pytest.mark.server
def test_kcbert_is_served_on_cleaned_text(server, references):
    """The served token count is the cleaned text's, not the raw text's, and the scores match the
    reference on the cleaned text only."""
    reference = references[KCBERT_MODEL]
    raw_length = len(reference.tokenizer(NOISY_COMMENT)["input_ids"])
    cleaned_length = len(reference.tokenizer(kcbert_clean(NOISY_COMMENT))["input_ids"])
    assert raw_length != cleaned_length
    with PatentClassifier(server.grpc_url, model=KCBERT_MODEL) as client:
        answer = client.classify(NOISY_COMMENT, top_k=len(reference.labels))
    assert answer.token_count == cleaned_length
    reference.assert_matches(NOISY_COMMENT, served_probabilities(answer, reference.labels))


@pytest.mark.model
def test_llama_merge_is_proven_like_gemma(exported):
    from export.merged_model_export import MERGE_TOLERANCE

    report = exported.reports[LLAMA_MODEL]
    assert report.adapter is not None
    assert report.merged_in_float32.max_abs_logit_diff <= MERGE_TOLERANCE
    assert report.saved_model.max_abs_logit_diff <= MERGE_TOLERANCE
    # Llama-3 has no pad token: the export pads with end-of-text and records it for batching.
    reference = OfflineReference.for_served_model(exported, LLAMA_MODEL)
    assert reference.tokenizer.pad_token == reference.tokenizer.eos_token
    assert reference.model.config.pad_token_id == reference.tokenizer.eos_token_id


@pytest.mark.server
def test_cpu_threads_go_from_the_models_file_to_each_models_engine(exported, server):
    """The export writes each model's cpu_threads into its config.pbtxt, and each engine reports on
    Triton's metrics port the threads its forward passes run with: the models file's count, or for
    "auto" this machine's usable cores divided among the models the server hosts."""
    for name, setting in ((MODEL_NAME, "auto"), (KOELECTRA_MODEL, KOELECTRA_CPU_THREADS)):
        config = (exported.repository / name / "config.pbtxt").read_text()
        assert f'parameters {{ key: "cpu_threads" value {{ string_value: "{setting}" }} }}' in config
    hosted = len([c for c in exported.repository.glob("*/config.pbtxt") if c.parent.name != FEEDBACK_MODEL])  # it computes nothing
    samples, _ = scrape(server.metrics_url)
    assert value(samples, "pc_engine_cpu_threads", model=MODEL_NAME) == max(1, len(os.sched_getaffinity(0)) // hosted)
    assert value(samples, "pc_engine_cpu_threads", model=KOELECTRA_MODEL) == KOELECTRA_CPU_THREADS


def test_models_file_errors_name_the_model_and_the_field():
    document = {
        "defaults": {"max_batch_tokens": 1024},
        "models": [
            {"name": "fine", "base": "x", "serving": {"max_length": 512}},
            {"name": "koelectra", "base": "y", "serving": {"max_length": 4, "engine": "tensorrt"}},
            {"name": "lora-without-labels", "base": "z", "adapter": "a", "serving": {"max_length": 512}},
        ],
    }
    with pytest.raises(ModelsFileError) as raised:
        ModelsFile.parse(document)
    message = str(raised.value)
    assert "models[1] (koelectra).serving.max_length" in message and "greater than or equal to 8" in message
    assert "models[1] (koelectra).serving.engine" in message and "'torch' or 'vllm'" in message
    assert "models[2] (lora-without-labels)" in message and "labels: required with an adapter" in message
    with pytest.raises(ModelsFileError, match="repeated: \\['twice'\\]"):
        ModelsFile.parse({"models": [{"name": "twice", "base": "x", "serving": {"max_length": 64}}] * 2})


@pytest.mark.model
def test_unsupported_models_are_refused_at_export_with_the_reason(tmp_path, exported):
    from transformers import BertConfig

    from export.model_support import UnsupportedModel, check_servable

    masked_lm = tmp_path / "masked-lm"
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(masked_lm)
    with pytest.raises(UnsupportedModel, match="BertForMaskedLM.*not a \\*ForSequenceClassification"):
        check_servable(masked_lm, 128)
    multi_label = tmp_path / "multi-label"
    BertConfig(architectures=["BertForSequenceClassification"], problem_type="multi_label_classification").save_pretrained(multi_label)
    with pytest.raises(UnsupportedModel, match="multi_label_classification"):
        check_servable(multi_label, 128)

    # Through the CLI, as an operator meets it: KcBERT cannot take 512 tokens, and nothing is written.
    kcbert = exported.models.model(KCBERT_MODEL)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        f"models:\n  - name: too-long\n    base: {kcbert.base}\n    serving: {{max_length: 512}}\n", encoding="utf-8"
    )
    result = subprocess.run(
        [sys.executable, "-m", "export", "models", "--models-file", str(models_file), "--repository", str(tmp_path / "repo")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "model too-long" in result.stderr and "max_position_embeddings 300" in result.stderr
    assert not (tmp_path / "repo").exists()
