"""Session fixtures: the demo models, their export from a models file, and two real tritonservers
on free loopback ports: one serving the PyTorch engine (every model family), one serving the
vLLM engine (started only when a test asks for it, since vLLM takes the better part of a minute
to start on 2 cores).

Everything is built from scratch in a temporary folder, the way a user's `make serve` builds
it, so the suite tests the same path and needs nothing prepared beforehand.

The tiers (docs/testing.md): a test that needs torch or a model, a server, vLLM, a browser or a
long-running external tool carries the marker that says so (a module whose every test does,
``pytestmark``), and every such test is also ``slow``. ``make test-fast`` (``pytest --fast``) runs
the rest: it selects ``not slow``, does not even import a module marked slow as a whole, and
fails if anything it runs imports a heavy stack. So this file imports only light modules at
its top; the fixtures import what they build with.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml

from core.labels import LabelSet
from core.models_file import ModelsFile
from core.serving_config import ServingConfig
from core.text_preprocessing import Preprocessing, text_preprocessor
from export.triton_package import merged_model_dir, write_triton_model
from server.engine_hold import HOLD_FILE_ENV
from tests.parity import Float32Parity, assert_served_probabilities_match

if TYPE_CHECKING:
    from export.demo_models import DemoModelPaths
    from export.merged_model_export import MergeReport
    from server.launcher import TritonServer
    from tests.tls_certificates import CertificateFiles

# --- tiers ----------------------------------------------------------------------------------------

# Markers that put a test in the slow tier (registered, with what each means, in pyproject.toml).
SLOW_MARKERS = ("model", "server", "vllm", "browser", "tools")
# Fixtures that build or export models or start servers: a test that uses one must be slow.
SLOW_FIXTURES = frozenset({
    "demo_models", "family_demos", "exported", "server", "llama_demo", "vllm_repository", "vllm_server",
    "reference", "llama_reference", "secure_server", "postgres", "engine_factory",
})
# What the fast tier never imports: each takes seconds, and each means a model, vLLM or a browser.
HEAVY_MODULES = ("torch", "transformers", "peft", "vllm", "selenium", "streamlit")


def pytest_addoption(parser):
    parser.addoption(
        "--fast", action="store_true",
        help="the fast tier: -m 'not slow', without importing a module marked slow as a whole, and failing "
        "if anything imports " + ", ".join(HEAVY_MODULES),
    )


def pytest_configure(config):
    if config.getoption("fast"):
        given = config.option.markexpr
        config.option.markexpr = f"({given}) and not slow" if given else "not slow"


def pytest_ignore_collect(collection_path, config):
    # Importing such a module is what would cost (torch, transformers, vLLM at its top).
    if config.getoption("fast") and collection_path.suffix == ".py" and whole_module_markers(collection_path) & set(SLOW_MARKERS):
        return True
    return None


def whole_module_markers(path: Path) -> set[str]:
    """The markers a test module's top-level ``pytestmark`` names, read without importing it."""
    if not path.name.startswith("test_"):
        return set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "pytestmark" for target in node.targets):
            return {attribute.attr for attribute in ast.walk(node.value) if isinstance(attribute, ast.Attribute)} - {"mark"}
    return set()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    unmarked = []
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
        elif SLOW_FIXTURES & set(item.fixturenames):
            unmarked.append(f"{item.nodeid} uses {', '.join(sorted(SLOW_FIXTURES & set(item.fixturenames)))}")
    if unmarked:
        raise pytest.UsageError(
            "tests that build models or start servers without a marker saying so "
            f"({', '.join(SLOW_MARKERS)}):\n  " + "\n  ".join(unmarked)
        )


def heavy_modules_imported() -> list[str]:
    return [name for name in HEAVY_MODULES if name in sys.modules]


def pytest_collection_finish(session):
    if session.config.getoption("fast") and (imported := heavy_modules_imported()):
        raise pytest.UsageError(
            f"collecting the fast tier imported {', '.join(imported)}: a module with fast tests imports it at its top "
            "(import it inside the tests that need it, or mark the module slow)"
        )


@pytest.fixture(autouse=True)
def _fast_tier_stays_light(request):
    before = heavy_modules_imported()
    yield
    if request.config.getoption("fast") and (imported := sorted(set(heavy_modules_imported()) - set(before))):
        pytest.fail(f"{request.node.nodeid} imported {', '.join(imported)}: mark it slow ({', '.join(SLOW_MARKERS)})")


PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PATENTS = PROJECT_ROOT / "clients" / "examples" / "patents.jsonl"
MODEL_NAME = "kscst-gemma2"
TIGHT_MODEL_NAME = "kscst-gemma2-tight-queue"
VLLM_GEMMA2_MODEL = "kscst-gemma2-vllm"  # the same merged Gemma-2 as MODEL_NAME, served by the vLLM engine
VLLM_LLAMA_MODEL = "ipc-llama-vllm"
# The other families, served by the PyTorch engine beside MODEL_NAME from the same models file.
LLAMA_MODEL = "ipc-llama"
KCBERT_MODEL = "ipc-kcbert"
KOELECTRA_MODEL = "sentiment-koelectra"
MAX_LENGTH = 512
KCBERT_MAX_LENGTH = 300  # KcBERT's position embeddings
KOELECTRA_MAX_LENGTH = 60  # as the office trained it
KOELECTRA_CPU_THREADS = 2
# Tiny models need little KV cache; vLLM's default would reserve a share of the whole machine.
VLLM_KV_CACHE_MIB = 64
# The vLLM-engine Gemma-2 admits 24 full-length patents at a time: more than any of its tests
# sends at once, except the one that shows overload refused.
VLLM_MAX_QUEUE_TOKENS = 24 * 512


def shell_environment() -> dict[str, str]:
    """This process's environment as a reader's shell has it: under `make test` the suite inherits
    make's MAKELEVEL and MAKEFLAGS, and a make it starts would print `make[1]` where the reader's prints `make`."""
    return {name: value for name, value in os.environ.items() if name not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}


# Every engine the tests start, in their servers or in this process, takes no batch while this file
# exists (server/engine_hold.py): a test that needs requests to stay queued holds them with it.
ENGINE_HOLD_FILE = Path(tempfile.mkdtemp(prefix="engine-hold-")) / "hold"
os.environ[HOLD_FILE_ENV] = str(ENGINE_HOLD_FILE)


@contextlib.contextmanager
def held_engines():
    ENGINE_HOLD_FILE.touch()
    try:
        yield
    finally:
        ENGINE_HOLD_FILE.unlink(missing_ok=True)


def example_records() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE_PATENTS.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Export:
    demo: DemoModelPaths
    repository: Path
    merged_dir: Path
    report: MergeReport
    models: ModelsFile
    reports: dict[str, MergeReport]
    records_database: str  # where MODEL_NAME records its predictions and the feedback model their corrections


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> DemoModelPaths:
    from export.demo_models import build_gemma2_demo

    return build_gemma2_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def family_demos(tmp_path_factory) -> dict[str, DemoModelPaths]:
    """The other families' demo models, by the Triton model name they are served under."""
    from export.demo_models import build_kcbert_demo, build_koelectra_demo, build_llama_demo

    folder = tmp_path_factory.mktemp("family-demos")
    return {
        LLAMA_MODEL: build_llama_demo(folder),
        KCBERT_MODEL: build_kcbert_demo(folder),
        KOELECTRA_MODEL: build_koelectra_demo(folder),
    }


def demo_models_file(gemma2: DemoModelPaths, families: dict[str, DemoModelPaths], records_database: str) -> dict:
    """The tests' models file: what models.yaml says, with the tests' demo folders and small batches
    (several forward passes per test, so requests really share them), one model with a thread
    count of its own, unlike its neighbours' "auto" share (tests/test_model_families.py), and the
    Gemma-2 model recording its predictions with their text into a SQLite file (tests/test_feedback.py)."""
    def entry(name: str, paths: DemoModelPaths, **serving) -> dict:
        return {"name": name, "base": str(paths.base), "adapter": str(paths.adapter) if paths.adapter else None,
                "labels": str(paths.labels), "serving": serving}

    return {
        # float32: the parity tests compare with transformers' float32 (on a CPU with native bf16,
        # "auto" would compute in bf16; tests/test_precision.py covers that).
        "defaults": {"max_batch_tokens": 4096, "device": "cpu", "dtype": "float32"},
        "models": [
            entry(MODEL_NAME, gemma2, max_length=MAX_LENGTH, prediction_records="text", records_database=records_database),
            entry(LLAMA_MODEL, families[LLAMA_MODEL], max_length=MAX_LENGTH),
            entry(KCBERT_MODEL, families[KCBERT_MODEL], max_length=KCBERT_MAX_LENGTH, preprocessing="kcbert"),
            entry(KOELECTRA_MODEL, families[KOELECTRA_MODEL], max_length=KOELECTRA_MAX_LENGTH, cpu_threads=KOELECTRA_CPU_THREADS),
        ],
    }


@pytest.fixture(scope="session")
def exported(demo_models, family_demos, tmp_path_factory) -> Export:
    from export.models_file_export import export_models

    repository = tmp_path_factory.mktemp("model_repository")
    records_database = f"sqlite:///{tmp_path_factory.mktemp('records') / 'prediction-records.db'}"
    models = ModelsFile.parse(demo_models_file(demo_models, family_demos, records_database))
    reports = export_models(models, repository)
    merged_dir = merged_model_dir(repository, MODEL_NAME)
    # The Gemma-2 weights behind a queue that holds two full-length patents and computes them one
    # at a time: admission control and deadlines become observable with a handful of requests.
    # It records nothing: its answers carry prediction ids all the same.
    tight = models.model(MODEL_NAME).serving.model_copy(update={
        "model_dir": merged_dir, "max_batch_tokens": MAX_LENGTH, "max_queue_tokens": 2 * MAX_LENGTH, "prediction_records": "off",
    })
    write_triton_model(repository, TIGHT_MODEL_NAME, tight)
    return Export(demo_models, repository, merged_dir, reports[MODEL_NAME], models, reports, models.records_database)


def start_tritonserver(repository: Path, tmp_path_factory, ready_timeout_s: float) -> TritonServer:
    from server.launcher import LaunchConfig, TritonServer, free_loopback_ports

    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    config = LaunchConfig(
        model_repository=repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        backend_directory=tmp_path_factory.mktemp("backends"),
        ready_timeout_s=ready_timeout_s,
    )
    return TritonServer(config, log_path=tmp_path_factory.mktemp("logs") / "tritonserver.log")


@pytest.fixture
def engine_factory(exported):
    """PyTorch engines on the exported demo, float32 unless overridden, each recording its
    batches in ``engine.batches``; stopped at the end of the test."""
    from core.serving_config import ServingConfig
    from server.torch_engine import TorchEngine

    engines = []

    def build(**overrides):
        settings = dict(model_dir=exported.merged_dir, max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu", dtype="float32")
        engine = TorchEngine(ServingConfig(**{**settings, **overrides}))
        engine.start()
        engine.batches = []
        engine.observe_batches(engine.batches.append)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.stop(drain_timeout_s=60)


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    with start_tritonserver(exported.repository, tmp_path_factory, ready_timeout_s=180) as running:
        yield running


@pytest.fixture(scope="session")
def llama_demo(family_demos) -> DemoModelPaths:
    return family_demos[LLAMA_MODEL]


@pytest.fixture(scope="session")
def vllm_repository(exported, llama_demo, tmp_path_factory) -> Path:
    """Two vLLM-engine models: the Llama demo exported the way a user does, from a one-entry
    models file with `python -m export models`, and the Gemma-2 export above (its merged folder,
    not a copy)."""
    repository = tmp_path_factory.mktemp("vllm_model_repository")
    models_file = tmp_path_factory.mktemp("vllm_models") / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": [{
        "name": VLLM_LLAMA_MODEL, "base": str(llama_demo.base), "adapter": str(llama_demo.adapter),
        "labels": str(llama_demo.labels), "proof_documents": 4,
        "serving": {"engine": "vllm", "max_length": MAX_LENGTH, "vllm_kv_cache_mib": VLLM_KV_CACHE_MIB, "dtype": "float32"},
    }]}), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "export", "models", "--models-file", str(models_file), "--repository", str(repository)],
        cwd=PROJECT_ROOT, check=True, capture_output=True, timeout=300,
    )
    # Written after the export: an export of the whole file removes folders of ours it does not list.
    gemma2 = ServingConfig(
        engine="vllm", model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096,
        vllm_kv_cache_mib=VLLM_KV_CACHE_MIB, max_queue_tokens=VLLM_MAX_QUEUE_TOKENS, dtype="float32",
    )
    write_triton_model(repository, VLLM_GEMMA2_MODEL, gemma2)
    return repository


@pytest.fixture(scope="session")
def vllm_server(vllm_repository, tmp_path_factory):
    with start_tritonserver(vllm_repository, tmp_path_factory, ready_timeout_s=480) as running:
        yield running


class OfflineReference:
    """The merged model in plain transformers, float32, eager attention, one document at a time,
    on the text after the model's own cleaning: what the served answers must equal."""

    def __init__(self, merged_dir: Path, max_length: int = MAX_LENGTH, preprocessing: Preprocessing = "none"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            merged_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.labels = LabelSet.for_model_dir(merged_dir)
        self.max_length = max_length
        self.preprocess = text_preprocessor(preprocessing) or (lambda text: text)
        # How far a served float32 answer may stray from this one: tests/parity.py.
        self.parity = Float32Parity.for_model(self.model.config, max_length)
        # Tests compare a text's probabilities and assert_matches it: one forward pass serves both.
        self._computed: dict[str, tuple[np.ndarray, int]] = {}

    def logits(self, text: str) -> tuple[np.ndarray, int]:
        import torch

        if text not in self._computed:
            encoded = self.tokenizer(self.preprocess(text), truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                self._computed[text] = self.model(**encoded).logits[0].numpy(), int(encoded["input_ids"].shape[1])
        logits, token_count = self._computed[text]
        return logits.copy(), token_count

    def probabilities(self, text: str) -> tuple[np.ndarray, int]:
        import torch

        logits, token_count = self.logits(text)
        return torch.softmax(torch.as_tensor(logits), dim=-1).numpy(), token_count

    def assert_matches(self, text: str, served_probabilities: np.ndarray, classes=None) -> None:
        """``served_probabilities`` (every class in label order, or those of ``classes``) are this
        model's float32 answer for ``text``, within the bound of tests/parity.py."""
        assert_served_probabilities_match(self.parity, self.logits(text)[0], served_probabilities, classes)

    def untruncated_length(self, text: str) -> int:
        return len(self.tokenizer(self.preprocess(text))["input_ids"])

    @classmethod
    def for_served_model(cls, export: "Export", name: str) -> "OfflineReference":
        serving = export.models.model(name).serving
        return cls(merged_model_dir(export.repository, name), serving.max_length, serving.preprocessing)


@pytest.fixture(scope="session")
def reference(exported) -> OfflineReference:
    return OfflineReference(exported.merged_dir)


@pytest.fixture(scope="session")
def llama_reference(vllm_repository) -> OfflineReference:
    return OfflineReference(merged_model_dir(vllm_repository, VLLM_LLAMA_MODEL))


# --- TLS, access token, faults: one extra server shared by test_security.py and test_faults.py ---
ACCESS_TOKEN = "test-token-0123456789abcdef"


@dataclass
class SecureServer:
    server: TritonServer
    certificates: "CertificateFiles"
    token: str
    token_file: Path


@pytest.fixture(scope="session")
def secure_server(exported, tmp_path_factory):
    """The demo model alone, behind TLS (gRPC and HTTPS) and the access token, with dead-stub reload on."""
    from pydantic import SecretStr

    from server.launcher import LaunchConfig, TritonServer, free_loopback_ports
    from tests.tls_certificates import write_test_certificates

    folder = tmp_path_factory.mktemp("secure")
    certificates = write_test_certificates(folder / "certificates")
    token_file = folder / "token"
    token_file.write_text(ACCESS_TOKEN + "\n", encoding="utf-8")
    repository = folder / "model_repository"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu", dtype="float32"
    ))
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    config = LaunchConfig(
        model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        backend_directory=folder / "backends", ready_timeout_s=180, exit_timeout_s=5,
        tls_certificate=certificates.server_certificate, tls_key=certificates.server_key, token=SecretStr(ACCESS_TOKEN),
    )
    with TritonServer(config, log_path=folder / "tritonserver.log") as running:
        yield SecureServer(running, certificates, ACCESS_TOKEN, token_file)


# --- a real PostgreSQL (Debian's package), for the records database -------------------------------


@pytest.fixture(scope="session")
def postgres():
    from benchmarks.postgres_server import PostgresServer

    with PostgresServer() as running:
        yield running
