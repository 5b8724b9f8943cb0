"""Re-exporting a model a tritonserver serves: its folder changes only as a whole and only once the
new export is proven. A failed proof, a broken base and a killed export leave the served model
answering exactly as before, its files unchanged; the next export cleans up after a killed one,
and is served as the next version (records and metrics tell the two exports apart)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from patent_classifier_client import PatentClassifier
from core.labels import LabelSet
from core.synthetic_patents import synthetic_patents
from export import repository_staging
from export.repository_staging import RepositoryStaging, StagingError
from export.triton_package import merged_model_dir, model_versions, next_model_version, write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports
from tests.conftest import MAX_LENGTH, MODEL_NAME, PROJECT_ROOT, OfflineReference
from tests.test_serving import served_probabilities

PROBES = [document.render() for document in synthetic_patents(3, seed=41)]
EXPORT_TIMEOUT_S = 300


@dataclass
class ServedExport:
    folder: Path
    repository: Path
    server: TritonServer | None
    entry: dict  # the models-file entry the served model was exported from

    @property
    def staging(self) -> Path:
        return RepositoryStaging(self.repository).root

    def export(self, **changes) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(**changes), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)

    def command(self, **changes) -> list[str]:
        models_file = self.folder / f"models-{len(list(self.folder.glob('models-*.yaml')))}.yaml"
        models_file.write_text(yaml.safe_dump({"models": [{**self.entry, **changes}]}), encoding="utf-8")
        return [sys.executable, "-m", "export", "models", "--models-file", str(models_file), "--repository", str(self.repository)]

    def answers(self) -> np.ndarray:
        labels = LabelSet.for_model_dir(merged_model_dir(self.repository, MODEL_NAME))
        with PatentClassifier(self.server.grpc_url, model=MODEL_NAME) as client:
            return np.stack([served_probabilities(client.classify(text, top_k=len(labels)), labels) for text in PROBES])

    def reload(self) -> None:
        """Make Triton read the model folder again, as its dead-stub watchdog would (with the launch's key)."""
        request = urllib.request.Request(
            f"http://{self.server.http_url}/v2/repository/models/{MODEL_NAME}/load", data=b"{}", method="POST",
            headers=self.server.admin_headers(),
        )
        with urllib.request.urlopen(request, timeout=180) as response:
            assert response.status == 200

    def served_versions(self) -> list[str]:
        """The versions Triton serves the model in (its model metadata)."""
        with urllib.request.urlopen(f"http://{self.server.http_url}/v2/models/{MODEL_NAME}", timeout=30) as answer:
            return json.loads(answer.read())["versions"]

    def files(self) -> dict[str, str]:
        folder = self.repository / MODEL_NAME
        return {
            str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()
        }


@pytest.fixture(scope="module")
def served(demo_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("atomic-export")
    entry = {
        "name": MODEL_NAME, "base": str(demo_models.base), "adapter": str(demo_models.adapter),
        "labels": str(demo_models.labels), "proof_documents": 4,
        "serving": {"max_length": MAX_LENGTH, "max_batch_tokens": 4096, "device": "cpu"},
    }
    export = ServedExport(folder, folder / "model_repository", None, entry)
    first = export.export()
    assert first.returncode == 0, first.stderr
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    # Explicit model control, for the repository API's reload, and the dead-stub watchdog on: a
    # stub that a reload replaces on purpose must not be taken for a dead one.
    config = LaunchConfig(
        model_repository=export.repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        backend_directory=folder / "backends", ready_timeout_s=180, models=(MODEL_NAME,),
    )
    with TritonServer(config, log_path=folder / "tritonserver.log") as server:
        export.server = server
        yield export


def _adapter_missing_a_target(demo, folder: Path) -> Path:
    """adapter_config.json no longer targets down_proj, while its weights still carry down_proj's
    LoRA matrices: PEFT (the reference) leaves them out, the merge merges every update it finds."""
    shutil.copytree(demo.adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = [module for module in config["target_modules"] if module != "down_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _base_with_a_nan(demo, folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(demo.base, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _retrained_head(demo, folder: Path) -> Path:
    """A valid adapter whose answers differ: the head a second fine-tune would have trained."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(demo.adapter, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    weights["base_model.model.score.weight"] = torch.roll(weights["base_model.model.score.weight"], shifts=1, dims=0)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.server
@pytest.mark.parametrize("tamper, field, returncode, message", [
    (_adapter_missing_a_target, "adapter", 1, "merge proof FAILED"),
    (_base_with_a_nan, "base", 2, "holds NaN"),
])
def test_a_failed_export_leaves_the_served_model_as_it_was(served, demo_models, tmp_path, tamper, field, returncode, message):
    answers, files = served.answers(), served.files()

    result = served.export(**{field: str(tamper(demo_models, tmp_path / field))})

    assert result.returncode == returncode, result.stderr
    assert message in result.stderr
    assert f"{served.repository / MODEL_NAME} is unchanged: the previous export is still served" in result.stderr
    assert served.files() == files
    assert [path.name for path in served.staging.iterdir()] == [".lock"]
    served.reload()
    assert np.array_equal(served.answers(), answers)


@pytest.mark.server
def test_an_export_killed_midway_leaves_the_served_model_and_the_next_one_cleans_up(served, demo_models, tmp_path):
    answers, files = served.answers(), served.files()
    assert served.served_versions() == ["1"]  # the first export (the failed ones above used no number)
    retrained = _retrained_head(demo_models, tmp_path / "retrained")

    export = subprocess.Popen(served.command(adapter=str(retrained)), cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    # Killed once its merged weights and config are in staging: the proof, seconds long, then runs.
    while not list(served.staging.glob(f"*/{MODEL_NAME}/*/model/config.json")):
        assert export.poll() is None and time.monotonic() < deadline, "the export ended before it could be killed"
        time.sleep(0.01)
    assert export.poll() is None
    os.kill(export.pid, signal.SIGKILL)
    export.communicate(timeout=30)
    assert export.returncode == -signal.SIGKILL

    assert served.files() == files
    served.reload()
    assert np.array_equal(served.answers(), answers)
    [leftover] = [path for path in served.staging.iterdir() if path.name != ".lock"]

    result = served.export(adapter=str(retrained))
    assert result.returncode == 0, result.stderr
    assert f"removed {leftover}, left by an export that did not finish" in result.stderr
    assert [path.name for path in served.staging.iterdir()] == [".lock"]
    assert served.files() != files
    served.reload()
    assert served.served_versions() == ["2"] and model_versions(served.repository, MODEL_NAME) == [2]
    after = served.answers()
    assert np.abs(after - answers).max() > 0.01  # the retrained head is served ...
    reference = OfflineReference(merged_model_dir(served.repository, MODEL_NAME))
    for text, served_probabilities in zip(PROBES, after):  # ... as transformers computes it from the new folder
        reference.assert_matches(text, served_probabilities)
    # The reloads replaced stubs on purpose; the watchdog, looking twice a second, took none for dead.
    watchdog = served.server.watchdog
    time.sleep(6 * watchdog.poll_s)
    assert watchdog.recoveries == []


def test_each_export_of_a_model_gets_the_next_version_and_writing_a_model_keeps_its_version(tmp_path):
    from core.serving_config import ServingConfig

    assert next_model_version(tmp_path, "m") == "1"
    write_triton_model(tmp_path, "m", ServingConfig(model_dir=Path("model"), max_length=64))
    assert model_versions(tmp_path, "m") == [1] and next_model_version(tmp_path, "m") == "2"
    (tmp_path / "m" / "7").mkdir()
    (tmp_path / "m" / "notes").mkdir()  # not a version: Triton ignores it, and so does the count
    assert next_model_version(tmp_path, "m") == "8"
    write_triton_model(tmp_path, "m", ServingConfig(model_dir=Path("model"), max_length=64))  # rewrites the served one
    assert (tmp_path / "m" / "7" / "model.py").exists() and model_versions(tmp_path, "m") == [1, 7]
    assert merged_model_dir(tmp_path, "m") == tmp_path / "m" / "7" / "model"


def _model_folder(repository: Path, name: str, content: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(content)


def test_a_swap_without_atomic_exchange_moves_the_old_folder_aside_and_the_next_export_undoes_a_half_swap(tmp_path, monkeypatch):
    """Where renameat2's exchange is missing (a filesystem without it), publishing takes two
    renames; an export killed between them has moved the served folder aside only, and the next
    export puts it back before anything else."""
    repository = tmp_path / "repository"
    monkeypatch.setattr(repository_staging, "_exchange", lambda first, second: False)
    with RepositoryStaging(repository) as staging:
        _model_folder(repository, "m", "old")
        staged = staging.new_repository()
        _model_folder(staged, "m", "new")
        staging.publish(staged, "m")
        assert (repository / "m" / "config.pbtxt").read_text() == "new"
        assert [path.name for path in staging.root.iterdir()] == [".lock"]

        killed = staging.new_repository()
        os.rename(repository / "m", killed / "m.previous")  # the first rename, then the kill
    with RepositoryStaging(repository) as staging:
        assert (repository / "m" / "config.pbtxt").read_text() == "new"
        assert [path.name for path in staging.root.iterdir()] == [".lock"]


def test_one_export_at_a_time_per_repository(tmp_path):
    with RepositoryStaging(tmp_path / "repository"):
        with pytest.raises(StagingError, match="another export into .* is running"):
            RepositoryStaging(tmp_path / "repository").__enter__()
