"""The export: the streamed LoRA merge against PEFT's, the proof (whole and layer by layer), the
files it writes, and the adapters it refuses."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, Gemma2ForCausalLM

from core.hf_classifier import class_logits, load_sequence_classifier, load_tokenizer
from core.labels import LABELS_FILENAME, LabelSet
from export.checkpoint_files import SAFETENSORS_INDEX, CheckpointFolder, SafetensorsWriter, TensorSpec
from export.merged_model_export import (
    LAYER_BY_LAYER, MERGE_TOLERANCE, WHOLE, ExportProof, _sources, export_classifier, proof_texts,
)
from export.model_support import UnsupportedModel, ensure_pad_token
from export.triton_package import merged_model_dir
from tests.conftest import KCBERT_MODEL, KOELECTRA_MODEL, LLAMA_MODEL, MAX_LENGTH, MODEL_NAME, PROJECT_ROOT
from tests.parity import Float32Parity

pytestmark = pytest.mark.model  # merges and proofs in torch

# Both sides compute W + scale·(B·A) in float32 with PEFT's operations; only the summation order
# inside the rank-r product may differ between matmul kernels. In the demo adapters
# (export/demo_models.py) |A| ≤ 1/√fan_in (PEFT's initialisation), B ~ N(0, 0.05) and W ~ N(0, 0.02),
# so Σ_k |B_ik|·|A_kj| stays near 0.1 at most: two summation orders differ by at most about
# r·2⁻²⁴·0.1·scale (r ≤ 8, scale ≤ 8 in these tests), below 1e-6, and the final add is correctly
# rounded on both sides. A merge that missed a module, the scale or a transpose is off by ~1e-2.
MERGE_EQUALITY = 1e-6


def _served_model(exported, name: str, **changes):
    model = exported.models.model(name)
    return model.model_copy(update=changes) if changes else model


def _peft_merged(exported, name: str) -> dict[str, torch.Tensor]:
    """The reference merge: PEFT's merge_and_unload on the float32 base, as the export used to do."""
    from peft import PeftModel

    model = exported.models.model(name)
    labels = LabelSet.read_tsv(model.labels)
    base = load_sequence_classifier(
        model.base, torch.float32, num_labels=len(labels), id2label=labels.id2label(),
        label2id={code: index for index, code in labels.id2label().items()},
    )
    return PeftModel.from_pretrained(base, model.adapter).merge_and_unload()


@pytest.mark.parametrize("name", [MODEL_NAME, LLAMA_MODEL])
def test_the_streamed_merge_equals_peft_merge_and_unload_tensor_for_tensor(exported, name):
    reference = _peft_merged(exported, name).state_dict()
    merged = load_file(merged_model_dir(exported.repository, name) / "model.safetensors")
    assert set(merged) == set(reference)
    differences = {key: (merged[key] - reference[key]).abs().max().item() for key in reference}
    assert max(differences.values()) <= MERGE_EQUALITY, sorted(differences.items(), key=lambda item: -item[1])[:3]
    assert exported.reports[name].merged_weights == 14  # 7 projections × 2 layers: every LoRA update merged


@pytest.mark.parametrize("name", [MODEL_NAME, LLAMA_MODEL, KCBERT_MODEL, KOELECTRA_MODEL])
def test_the_export_writes_the_files_save_pretrained_wrote(exported, name, tmp_path):
    """What `make export` wrote before the streamed merge (transformers' save_pretrained of the
    merged model, the tokenizer, labels.tsv), written here by that old path, equals what it writes now."""
    model = exported.models.model(name)
    if model.adapter is not None:
        before = _peft_merged(exported, name)
        tokenizer = load_tokenizer(model.adapter)
    else:
        before = load_sequence_classifier(model.base, torch.float32)
        tokenizer = load_tokenizer(model.base)
    ensure_pad_token(tokenizer, before.config, model.base)  # as the old path did (Llama-3 has no pad token)
    before.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    LabelSet.read_tsv(model.labels).write_tsv(tmp_path / LABELS_FILENAME)

    now = merged_model_dir(exported.repository, name)
    for file in ("config.json", "tokenizer_config.json", "tokenizer.json", LABELS_FILENAME):
        assert (now / file).read_bytes() == (tmp_path / file).read_bytes(), file
    saved_before, saved_now = load_file(tmp_path / "model.safetensors"), load_file(now / "model.safetensors")
    assert set(saved_now) == set(saved_before)
    assert all(saved_now[key].dtype == saved_before[key].dtype for key in saved_now)
    assert max((saved_now[key] - saved_before[key]).abs().max().item() for key in saved_now) <= MERGE_EQUALITY


def test_merge_report_proves_the_merge(exported):
    report = json.loads((exported.merged_dir / "merge_report.json").read_text())
    for comparison in (report["merged_in_float32"], report["saved_model"]):
        assert comparison["documents"] == 16
        assert comparison["max_abs_logit_diff"] <= MERGE_TOLERANCE
        assert comparison["top1_agreement"] == 1.0
    assert report["proof"] == WHOLE  # the demo fits the default budget


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


def test_a_proof_over_budget_runs_layer_by_layer_and_computes_what_the_whole_model_does(exported):
    """The same patents, batches and float32 operations, only loaded a layer at a time: both
    sides of the proof equal the whole-model proof's within float32 summation-order rounding
    (tests/parity.py), far inside the 1e-4 gate."""
    model = _served_model(exported, MODEL_NAME)
    _, adapter, tokenizer, config, base = _sources(model)
    whole = ExportProof(model, config, base, adapter, tokenizer, device="cpu", proof_memory_gib=1.0)
    streamed = ExportProof(model, config, base, adapter, tokenizer, device="cpu", proof_memory_gib=0.003)
    assert (whole.mode, streamed.mode) == (WHOLE, LAYER_BY_LAYER)
    parity = Float32Parity.for_model(config, MAX_LENGTH)
    assert parity.logit_excess(whole.reference(), streamed.reference()) <= 1.0
    assert parity.logit_excess(whole.saved(exported.merged_dir), streamed.saved(exported.merged_dir)) <= 1.0
    with pytest.raises(UnsupportedModel, match=r"layer by layer, but proof_memory_gib is 0.0005"):
        ExportProof(model, config, base, adapter, tokenizer, device="cpu", proof_memory_gib=0.0005)


def _causal_lm_base(demo, folder):
    """google/gemma-2-9b's form: a Gemma2ForCausalLM checkpoint (no classes, keys model.*), sharded
    with an index, here with an untied lm_head so the export has one to drop."""
    classifier = AutoModelForSequenceClassification.from_pretrained(demo.base, dtype=torch.float32)
    config = classifier.config
    config.tie_word_embeddings = False
    for key in ("id2label", "label2id"):
        setattr(config, key, {0: "LABEL_0", 1: "LABEL_1"} if key == "id2label" else {"LABEL_0": 0, "LABEL_1": 1})
    causal = Gemma2ForCausalLM(config)
    causal.model.load_state_dict(classifier.model.state_dict())
    causal.save_pretrained(folder, max_shard_size="2MB")
    load_tokenizer(demo.base).save_pretrained(folder)


def test_a_causal_lm_base_gets_its_classifier_from_the_merge(exported, tmp_path):
    _causal_lm_base(exported.demo, tmp_path / "causal")
    assert (tmp_path / "causal" / SAFETENSORS_INDEX).exists()
    model = _served_model(exported, MODEL_NAME, base=tmp_path / "causal", proof_documents=4)
    report = export_classifier(model, tmp_path / "out")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForSequenceClassification"] and len(config["id2label"]) == 188
    assert report.dropped_tensors == ["lm_head.weight"]
    assert report.merged_in_float32.max_abs_logit_diff <= MERGE_TOLERANCE
    merged = CheckpointFolder(tmp_path / "out")
    assert len(merged.shards) > 1 and "lm_head.weight" not in merged
    # The same backbone and adapter as the classifier-base export: the same merged tensors.
    from_classifier_base = load_file(exported.merged_dir / "model.safetensors")
    assert set(merged.keys()) == set(from_classifier_base)
    assert all(torch.equal(merged.read(key), from_classifier_base[key]) for key in from_classifier_base)


def _copy_adapter(exported, folder, **config_changes):
    shutil.copytree(exported.demo.adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(config_changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("setting, value, reason", [
    ("use_dora", True, "DoRA rescales every merged column"),
    ("lora_bias", True, "LoRA biases"),
    ("alora_invocation_tokens", [5, 6], "aLoRA applies the adapter only after its invocation tokens"),
    ("peft_type", "IA3", "merges LoRA adapters only"),
    ("modules_to_save", None, "does not carry the classification head"),
])
def test_adapters_the_merge_does_not_compute_are_refused_naming_the_setting(exported, tmp_path, setting, value, reason):
    adapter = _copy_adapter(exported, tmp_path / "adapter", **{setting: value})
    with pytest.raises(UnsupportedModel, match=reason):
        export_classifier(_served_model(exported, MODEL_NAME, adapter=adapter), tmp_path / "out")


def test_rslora_and_per_module_ranks_and_alphas_merge_as_peft_merges_them(exported, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _served_model(exported, MODEL_NAME)
    labels = LabelSet.read_tsv(model.labels)
    overrides = dict(num_labels=len(labels), id2label=labels.id2label())
    base = load_sequence_classifier(model.base, torch.float32, **overrides)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, use_rslora=True, modules_to_save=["score"],
        target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 3},
    )
    peft_model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(
        load_sequence_classifier(model.base, torch.float32, **overrides), tmp_path / "adapter"
    ).merge_and_unload().state_dict()

    report = export_classifier(model.model_copy(update={"adapter": tmp_path / "adapter", "proof_documents": 2}), tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert report.merged_weights == 6
    assert max((merged[key] - reference[key]).abs().max().item() for key in reference) <= MERGE_EQUALITY


def test_bfloat16_export_is_gated_in_float32_and_saved_in_bfloat16(exported, tmp_path):
    model = _served_model(exported, MODEL_NAME, weights_dtype="bfloat16", proof_documents=4)
    report = export_classifier(model, tmp_path / "bf16")
    assert report.merged_in_float32.max_abs_logit_diff <= MERGE_TOLERANCE
    assert report.saved_model.max_abs_logit_diff > MERGE_TOLERANCE  # bf16 rounding, reported not hidden
    assert {tensor.dtype for tensor in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_verify_accepts_the_export_and_fails_a_tampered_merged_model(exported, tmp_path):
    models_file = tmp_path / "models.yaml"
    entry = exported.models.model(MODEL_NAME).model_dump(mode="json", exclude={"serving": {"model_dir"}})
    models_file.write_text(yaml.safe_dump({"models": [{**entry, "proof_documents": 4}]}))

    def verify(repository):
        return subprocess.run(
            [sys.executable, "-m", "export", "verify", "--models-file", str(models_file), "--repository", str(repository)],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        )

    assert verify(exported.repository).returncode == 0
    tampered = tmp_path / "repository"
    shutil.copytree(exported.repository / MODEL_NAME, tampered / MODEL_NAME)
    weights_file = merged_model_dir(tampered, MODEL_NAME) / "model.safetensors"
    weights = load_file(weights_file)
    name = next(key for key in weights if key.endswith("layers.1.self_attn.o_proj.weight"))
    weights[name] = weights[name] + 0.01 * torch.randn_like(weights[name])
    save_file(weights, weights_file, metadata={"format": "pt"})

    result = verify(tampered)
    assert result.returncode == 1
    assert "merge proof FAILED" in result.stderr and "exceeds the tolerance 0.0001" in result.stderr


def test_checkpoint_files_read_and_write_what_safetensors_does(tmp_path):
    tensors = {
        "embed": torch.randn(300, 7), "norm": torch.randn(7).to(torch.bfloat16), "scalar": torch.tensor(3.0),
        "ids": torch.arange(10), "mask": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    folder = CheckpointFolder(tmp_path)
    assert all(torch.equal(folder.read(key), tensor) for key, tensor in tensors.items())
    rows = torch.tensor([0, 1, 2, 5, 299])
    assert torch.equal(folder.read_rows("embed", rows), tensors["embed"][rows])

    specs = {key: TensorSpec(tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()}
    with SafetensorsWriter(tmp_path / "written.safetensors", specs) as writer:
        writer.write("embed", tensors["embed"][:100])
        writer.write("embed", tensors["embed"][100:])
        for key in ("norm", "scalar", "ids", "mask"):
            writer.write(key, tensors[key])
    written = load_file(tmp_path / "written.safetensors")
    assert all(torch.equal(written[key], tensor) for key, tensor in tensors.items())
