"""The LoRA merge and its proof."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core.hf_classifier import class_logits, load_sequence_classifier, load_tokenizer
from core.labels import LabelSet
from export.merged_model_export import MERGE_TOLERANCE, MergeProofFailed, merge_lora, proof_texts
from tests.conftest import MAX_LENGTH, PROJECT_ROOT


def test_merge_report_proves_the_merge(exported):
    report = json.loads((exported.merged_dir / "merge_report.json").read_text())
    for comparison in (report["merged_in_float32"], report["saved_model"]):
        assert comparison["documents"] == 16
        assert comparison["max_abs_logit_diff"] <= MERGE_TOLERANCE
        assert comparison["top1_agreement"] == 1.0


def test_the_adapter_really_changes_the_answers(exported):
    """Otherwise the proof above would hold for a merge that did nothing."""
    texts = proof_texts(8)
    tokenizer = load_tokenizer(exported.merged_dir)
    base = load_sequence_classifier(exported.demo.base)
    merged = load_sequence_classifier(exported.merged_dir)
    difference = np.abs(class_logits(base, tokenizer, texts, MAX_LENGTH) - class_logits(merged, tokenizer, texts, MAX_LENGTH))
    assert difference.max() > 1000 * MERGE_TOLERANCE


def test_merged_folder_is_what_transformers_and_vllm_load(exported):
    config = json.loads((exported.merged_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForSequenceClassification"]
    assert len(config["id2label"]) == 188 and config["id2label"]["0"] == "KSCST-001"
    assert config["attn_logit_softcapping"] == 50.0
    assert config["pad_token_id"] == 0
    assert (exported.merged_dir / "model.safetensors").exists()
    assert len(LabelSet.for_model_dir(exported.merged_dir)) == 188


def verify(exported, merged_dir):
    return subprocess.run(
        [sys.executable, "-m", "export", "verify", "--base", str(exported.demo.base),
         "--adapter", str(exported.demo.adapter), "--merged", str(merged_dir), "--proof-documents", "4"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )


def test_verify_accepts_the_export_and_fails_a_tampered_merged_model(exported, tmp_path):
    assert verify(exported, exported.merged_dir).returncode == 0

    tampered = tmp_path / "tampered"
    shutil.copytree(exported.merged_dir, tampered)
    weights = load_file(tampered / "model.safetensors")
    name = next(key for key in weights if key.endswith("layers.1.self_attn.o_proj.weight"))
    weights[name] = weights[name] + 0.01 * torch.randn_like(weights[name])
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})

    result = verify(exported, tampered)
    assert result.returncode == 1
    assert "merge proof FAILED" in result.stderr and "exceeds the tolerance 0.0001" in result.stderr


def test_an_adapter_without_the_classification_head_is_refused(exported, tmp_path):
    adapter = tmp_path / "headless"
    shutil.copytree(exported.demo.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeProofFailed, match="does not carry the classification head"):
        merge_lora(exported.demo.base, adapter, LabelSet.read_tsv(exported.demo.labels), tmp_path / "out", proof_documents=2)


def test_bfloat16_export_is_gated_in_float32_and_saved_in_bfloat16(exported, tmp_path):
    report = merge_lora(
        exported.demo.base, exported.demo.adapter, LabelSet.read_tsv(exported.demo.labels), tmp_path / "bf16",
        dtype="bfloat16", proof_documents=4,
    )
    assert report.merged_in_float32.max_abs_logit_diff <= MERGE_TOLERANCE
    assert report.saved_model.max_abs_logit_diff > MERGE_TOLERANCE  # bf16 rounding, reported not hidden
    assert next(iter(load_file(tmp_path / "bf16" / "model.safetensors").values())).dtype == torch.bfloat16
