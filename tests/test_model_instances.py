"""One engine per device: the serving field ``instances`` becomes Triton's instance_group, each
instance runs its engine on the device Triton gives it, and on the CPU ``cpu_threads: auto``
shares the cores among all the instances. A model with two CPU instances in the real
tritonserver: both compute, and the answers equal offline transformers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from patent_classifier_client import PatentClassifier
from core.models_file import ModelsFile, ModelsFileError
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import config_pbtxt, write_triton_model
from server.cpu_share import cpu_engines_of
from server.launcher import LaunchConfig
from server.model_instance import ModelInstance
from tests.conftest import MAX_LENGTH, MODEL_NAME, start_tritonserver
from tests.test_monitoring import scrape
from tests.test_serving import example_documents, served_probabilities

KIND = model_config_pb2.ModelInstanceGroup.Kind
INSTANCES = 2


def instance_groups(config: ServingConfig) -> list:
    parsed = text_format.Parse(config_pbtxt("m", config), model_config_pb2.ModelConfig())
    return [(KIND.Name(group.kind), group.count, list(group.gpus)) for group in parsed.instance_group]


def serving(**fields) -> ServingConfig:
    return ServingConfig(model_dir=Path("model"), max_length=512, **fields)


def test_the_export_writes_tritons_instance_group():
    assert instance_groups(serving(instances={"gpus": [0, 1], "count": 2})) == [("KIND_GPU", 2, [0, 1])]
    # No gpus list: Triton places count instances on every GPU it sees.
    assert instance_groups(serving(instances={"gpus": "all"})) == [("KIND_GPU", 1, [])]
    assert instance_groups(serving(instances={"count": 3}, device="cpu")) == [("KIND_CPU", 3, [])]
    assert instance_groups(serving()) == [("KIND_MODEL", 1, [])]


def test_the_models_file_takes_instances_and_names_the_field_of_a_mistake():
    def models_file(instances, **serving_fields) -> ModelsFile:
        return ModelsFile.parse({"models": [
            {"name": "kscst", "base": "base", "serving": {"max_length": 512, "instances": instances, **serving_fields}}
        ]})

    assert models_file({"gpus": "all", "count": 2}).model("kscst").serving.instances.count == 2
    mistakes = [
        ({"gpus": [0, 0]}, {}, r"models\[0\] \(kscst\)\.serving\.instances\.gpus: .*distinct GPU indices"),
        ({"gpus": "every"}, {}, r"instances\.gpus: .*'all' or a list"),
        ({"count": 0}, {}, r"instances\.count: Input should be greater than or equal to 1"),
        ({"count": 65}, {}, r"instances\.count: Input should be less than or equal to 64"),
        ({"gpu": [0]}, {}, r"instances\.gpu: Extra inputs are not permitted"),
        ({"count": 2}, {"device": "cuda"}, r"without gpus the 2 engine\(s\) run on the CPU .* give instances\.gpus"),
        ({"gpus": "all"}, {"device": "cpu"}, r"device: is 'cpu'; with instances\.gpus"),
        ({"gpus": [1]}, {"device": "cuda:0"}, r"device: is 'cuda:0'; with instances\.gpus"),
        ({"count": 2}, {"engine": "vllm"}, r"instances\.count: is 2; with engine vllm it must be 1"),
        ({"gpus": "all", "count": 2}, {"engine": "vllm"}, r"instances\.count: is 2; with engine vllm it must be 1"),
    ]
    for instances, fields, message in mistakes:
        with pytest.raises(ModelsFileError, match=message):
            models_file(instances, **fields)


def test_each_instance_runs_its_engine_on_the_device_triton_gave_it(monkeypatch):
    torch_model = serving(instances={"gpus": "all"})
    assert ModelInstance("m_0_3", "GPU", 3).engine_config(torch_model).device == "cuda:3"
    assert ModelInstance("m_0_1", "CPU", 0).engine_config(serving(instances={"count": 2})).device == "cpu"
    assert ModelInstance("m_0_0", "MODEL", 0).engine_config(serving(device="cuda:1")).device == "cuda:1"

    # vLLM takes no device index: the instance's stub (and vLLM's engine core, its child) see only its GPU,
    # counted among the GPUs the server sees.
    vllm_model = serving(engine="vllm", instances={"gpus": "all"})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert ModelInstance("m_0_2", "GPU", 2).engine_config(vllm_model) == vllm_model
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    ModelInstance("m_0_1", "GPU", 1).engine_config(vllm_model)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ValueError, match=r"GPU 1, but CUDA_VISIBLE_DEVICES shows only \['6'\]"):
        ModelInstance("m_0_1", "GPU", 1).engine_config(vllm_model)


def test_the_launcher_counts_every_cpu_engine_of_every_model(tmp_path):
    models = {
        "two-on-the-cpu": serving(instances={"count": 2}, device="cpu"),
        "placed-by-device": serving(),
        "on-every-gpu": serving(instances={"gpus": "all", "count": 2}),
    }
    for name, config in models.items():
        write_triton_model(tmp_path, name, config)
    assert [cpu_engines_of(tmp_path / name / "config.pbtxt") for name in models] == [2, 1, 0]
    assert LaunchConfig(model_repository=tmp_path).cpu_engines == 3
    assert LaunchConfig(model_repository=tmp_path, models=("on-every-gpu",)).cpu_engines == 1  # at least 1


# --- one model, two CPU instances, in the real tritonserver ---------------------------------------


@pytest.fixture(scope="module")
def two_instance_server(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-instances")
    write_triton_model(folder / "model_repository", MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu",
        dtype="float32",  # the answers are held to the float32 reference's bound
        instances={"count": INSTANCES},
    ))
    with start_tritonserver(folder / "model_repository", tmp_path_factory, ready_timeout_s=180) as running:
        yield running


def per_instance(samples, name: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        labels = dict(labels)
        if sample == name and labels.get("model") == MODEL_NAME:
            values[labels["model_instance"]] = values.get(labels["model_instance"], 0.0) + value
    return values


@pytest.mark.server
def test_two_cpu_instances_both_compute_and_answer_what_transformers_computes(two_instance_server, reference):
    documents = example_documents() + synthetic_patents(6, seed=77, long_share=0.5)
    before = per_instance(scrape(two_instance_server.metrics_url)[0], "pc_documents_total")
    with PatentClassifier(two_instance_server.grpc_url, model=MODEL_NAME) as client:
        # One request at a time: Triton hands each to an idle instance in turn.
        answers = [client.classify(document, top_k=len(reference.labels)) for document in documents]

    for document, answer in zip(documents, answers):
        _, token_count = reference.probabilities(document.render())
        reference.assert_matches(document.render(), served_probabilities(answer, reference.labels))
        assert answer.token_count == token_count

    samples, _ = scrape(two_instance_server.metrics_url)
    computed = per_instance(samples, "pc_documents_total")
    assert sorted(computed) == [f"{MODEL_NAME}_0_{index}" for index in range(INSTANCES)]
    done = {instance: computed[instance] - before.get(instance, 0.0) for instance in computed}
    assert sum(done.values()) == len(documents)
    assert all(count > 0 for count in done.values()), done
    # cpu_threads auto: the server's cores divided among its two engines.
    threads = per_instance(samples, "pc_engine_cpu_threads")
    assert threads == {instance: max(1, len(os.sched_getaffinity(0)) // INSTANCES) for instance in computed}
