"""config.pbtxt parameters: validated once, when the model loads, with the field's name in the error."""
import re
from pathlib import Path

import pytest

from core.serving_config import ServingConfig


def parameters(**values) -> dict:
    return {key: {"string_value": str(value)} for key, value in values.items()}


def test_the_engine_is_chosen_per_model_in_its_parameters(tmp_path):
    config = ServingConfig.from_triton_parameters(
        parameters(engine="vllm", model_dir="model", max_length=512, vllm_kv_cache_mib=64, vllm_compile=False), tmp_path
    )
    assert (config.engine, config.vllm_kv_cache_mib, config.vllm_compile) == ("vllm", 64, False)
    assert config.model_dir == (tmp_path / "model").resolve()
    assert ServingConfig.from_triton_parameters(parameters(model_dir="model", max_length=512), tmp_path).engine == "torch"


def test_an_unknown_engine_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"engine: Input should be 'torch' or 'vllm'"):
        ServingConfig.from_triton_parameters(parameters(engine="onnx", model_dir="model", max_length=512), tmp_path)


def test_vllm_refuses_a_device_because_its_build_picks_one():
    with pytest.raises(ValueError, match="device: is 'cpu'; with engine vllm it must be 'auto'"):
        ServingConfig(engine="vllm", model_dir=Path("model"), max_length=512, device="cpu")


@pytest.mark.parametrize("fields, words", [
    ({"dtype": "int8", "device": "cuda"}, "dtype: is 'int8' with device 'cuda'; int8 is the CPU's precision"),
    ({"dtype": "fp8", "device": "cpu"}, "dtype: is 'fp8' with device 'cpu'; fp8 needs a GPU"),
    ({"dtype": "int8", "engine": "vllm"}, "dtype: is 'int8'; the vllm engine cannot quantize to int8"),
    ({"dtype": "int4"}, "dtype: Input should be 'auto', 'float32', 'bfloat16', 'float16', 'int8' or 'fp8'"),
])
def test_a_quantized_precision_must_fit_its_engine_and_device(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ServingConfig.from_triton_parameters(
            {key: {"string_value": value} for key, value in {"model_dir": "m", "max_length": "64", **fields}.items()}, Path("/v")
        )
    assert ServingConfig(model_dir=Path("m"), max_length=64, dtype="int8", device="cpu").dtype == "int8"


def test_written_parameters_read_back_the_same(tmp_path):
    for config in (
        ServingConfig(engine="vllm", model_dir=tmp_path, max_length=256, vllm_kv_cache_mib=128, vllm_compile=True),
        ServingConfig(model_dir=tmp_path, max_length=256, cpu_threads=3),
    ):
        written = {key: {"string_value": value} for key, value in config.to_triton_parameters().items()}
        assert ServingConfig.from_triton_parameters(written, tmp_path) == config


def test_cpu_threads_is_auto_or_a_thread_count(tmp_path):
    def cpu_threads(value):
        return ServingConfig.from_triton_parameters(parameters(model_dir="model", max_length=512, cpu_threads=value), tmp_path).cpu_threads

    assert (cpu_threads("auto"), cpu_threads(3)) == ("auto", 3)
    assert ServingConfig.from_triton_parameters(parameters(model_dir="model", max_length=512), tmp_path).cpu_threads == "auto"
    for wrong in ("0", "-2", "1.5", "all"):
        with pytest.raises(ValueError, match=r"cpu_threads: .*it must be 'auto' or a whole number of threads, at least 1"):
            cpu_threads(wrong)


def test_vllm_refuses_a_cpu_thread_count_because_it_places_its_own_threads():
    with pytest.raises(ValueError, match="cpu_threads: is 2; with engine vllm it must be 'auto'.*VLLM_CPU_OMP_THREADS_BIND"):
        ServingConfig(engine="vllm", model_dir=Path("model"), max_length=512, cpu_threads=2)


def test_the_batch_budget_must_hold_one_document_at_its_padded_width():
    with pytest.raises(ValueError, match=r"max_batch_tokens \(500\) must be at least max_length \(500\) rounded up .* 512"):
        ServingConfig(model_dir=Path("model"), max_length=500, pad_to_multiple_of=16, max_batch_tokens=500)
    assert ServingConfig(model_dir=Path("model"), max_length=500, pad_to_multiple_of=16, max_batch_tokens=512).max_batch_tokens == 512


def test_num_labels_is_written_from_the_merged_model_and_must_agree_with_it(tmp_path):
    from core.labels import Label, LabelSet
    from export.triton_package import merged_model_dir, write_triton_model

    merged = merged_model_dir(tmp_path, "m")
    merged.mkdir(parents=True)
    LabelSet(tuple(Label(f"C{i}", f"class {i}") for i in range(7))).write_tsv(merged / "labels.tsv")
    write_triton_model(tmp_path, "m", ServingConfig(model_dir=Path("model"), max_length=512))
    assert 'parameters { key: "num_labels" value { string_value: "7" } }' in (tmp_path / "m" / "config.pbtxt").read_text()

    config = ServingConfig.from_triton_parameters(parameters(model_dir="model", max_length=512, num_labels=7), merged.parent)
    assert len(config.model_labels()) == 7
    stale = config.model_copy(update={"num_labels": 9})
    with pytest.raises(ValueError, match=r"num_labels: config.pbtxt says 9, but .* has 7 labels"):
        stale.model_labels()
    # A model exported before num_labels existed still loads: nothing to check it against.
    assert "num_labels" not in ServingConfig(model_dir=Path("model"), max_length=512).to_triton_parameters()
def test_prediction_records_need_a_database_named_by_a_supported_url(tmp_path):
    with pytest.raises(ValueError, match="records_database: required with prediction_records 'hash'"):
        ServingConfig(model_dir=tmp_path, max_length=64, prediction_records="hash")
    with pytest.raises(ValueError, match=r"records_database\n.*is 'mysql://db/records'; it must be sqlite:///PATH"):
        ServingConfig(model_dir=tmp_path, max_length=64, prediction_records="hash", records_database="mysql://db/records")
    config = ServingConfig(model_dir=tmp_path, max_length=64, prediction_records="text", records_database="postgresql://pc@db/records")
    assert config.records_database == "postgresql+psycopg://pc@db/records"  # psycopg 3, which the server installs


def test_a_relative_sqlite_file_and_the_journal_lie_beside_the_repository(tmp_path):
    version_dir = tmp_path / "model_repository" / "m" / "1"
    config = ServingConfig.from_triton_parameters(
        parameters(model_dir="model", max_length=64, prediction_records="hash", records_database="sqlite:///records.db"), version_dir,
        environ={},
    )
    assert config.records_database == f"sqlite:///{tmp_path.resolve() / 'records.db'}"
    # Not inside the model's folder, which a re-export replaces whole.
    assert config.records_journal == tmp_path.resolve() / "prediction-journal"


def models_file(*servings, **extra) -> dict:
    return {"models": [{"name": f"m{i}", "base": "base", "serving": {"max_length": 64, **serving}} for i, serving in enumerate(servings)],
            **extra}


RECORDING = {"prediction_records": "hash", "records_database": "sqlite:///records.db"}


def test_the_models_file_adds_the_feedback_model_when_a_model_records(tmp_path):
    from core.models_file import ModelsFile

    models = ModelsFile.parse(models_file(RECORDING, {}, {"prediction_records": "text", "records_database": "sqlite:///records.db"},
                                          feedback={"live_accuracy_window": 50}), base_dir=tmp_path)
    assert models.triton_models == ["m0", "m1", "m2", "feedback"]
    assert models.records_database == f"sqlite:///{tmp_path / 'records.db'}"  # relative to the models file, as its paths are
    assert models.feedback_config.live_accuracy_window == 50
    assert ModelsFile.parse(models_file({})).triton_models == ["m0"]


@pytest.mark.parametrize("document, words", [
    (models_file(RECORDING, {"prediction_records": "hash", "records_database": "sqlite:///other.db"}),
     "records_database: the models that record predictions must share one database"),
    ({"models": models_file(RECORDING)["models"] + [{"name": "feedback", "base": "b", "serving": {"max_length": 64}}]},
     "'feedback' names the feedback model that recording predictions adds; rename this model"),
    (models_file({}, feedback={"live_accuracy_window": 50}), "feedback: set, but no model records predictions"),
    (models_file(RECORDING, feedback={"live_accuracy_window": 0}), "feedback.live_accuracy_window: Input should be greater than or equal to 1"),
])
def test_the_models_file_refuses_records_it_cannot_serve(document, words):
    from core.models_file import ModelsFile, ModelsFileError

    with pytest.raises(ModelsFileError, match=re.escape(words)):
        ModelsFile.parse(document)


def test_models_file_agreement_fields_are_validated():
    from core.models_file import ModelsFile, ModelsFileError

    entry = {"name": "m", "base": "x", "serving": {"max_length": 512}}
    with pytest.raises(ModelsFileError, match=r"models\[0\] \(m\)\.min_top1_agreement: Input should be less than or equal to 1"):
        ModelsFile.parse({"models": [{**entry, "min_top1_agreement": 1.5}]})
    with pytest.raises(ModelsFileError, match=r"agreement_documents: Input should be greater than or equal to 1"):
        ModelsFile.parse({"models": [{**entry, "agreement_documents": 0}]})
