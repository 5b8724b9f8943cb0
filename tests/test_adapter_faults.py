"""An exception that is not a typed ServingError, raised for one request of an ``execute`` call,
costs that request one error response and nothing else: the others are answered, none waits
forever, and the model keeps serving (through the real tritonserver)."""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from patent_classifier_client import AsyncPatentClassifier, PatentClassifier
from patent_classifier_client.errors import EngineFailure
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import MODEL_VERSION, write_triton_model
from tests.conftest import MAX_LENGTH, start_tritonserver
from tests.test_monitoring import scrape, value

pytestmark = pytest.mark.server  # every test here starts or calls a tritonserver

MODEL = "faulty-engine"
# Imported only inside the stub (it needs Triton's pb_utils): every third submission raises.
FAULTY_MODEL_PY = Path(__file__).parent / "triton_models" / "faulty_engine_model.py"
FAIL_EVERY = 3
REQUESTS = 9
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def faulty_server(exported, tmp_path_factory):
    repository = tmp_path_factory.mktemp("faulty_repository")
    write_triton_model(repository, MODEL, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu"
    ))
    shutil.copyfile(FAULTY_MODEL_PY, repository / MODEL / MODEL_VERSION / "model.py")
    with start_tritonserver(repository, tmp_path_factory, ready_timeout_s=180) as running:
        yield running


def test_a_plain_exception_fails_only_its_own_request(faulty_server):
    documents = synthetic_patents(REQUESTS, seed=71, long_share=0.3)

    async def send_all():
        async with AsyncPatentClassifier(faulty_server.grpc_url, model=MODEL, timeout_s=TIMEOUT_S) as client:
            async def one(document):
                try:
                    return await client.classify(document)
                except Exception as error:
                    return error
            return await asyncio.wait_for(asyncio.gather(*(one(d) for d in documents)), TIMEOUT_S + 10)

    failures_before = value(scrape(faulty_server.metrics_url)[0], "pc_requests_failed_total", model=MODEL, err="engine_failure")
    outcomes = asyncio.run(send_all())
    failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert len(failures) == REQUESTS // FAIL_EVERY, outcomes
    assert all(isinstance(error, EngineFailure) and "internal error: RuntimeError" in error.message for error in failures)
    assert sum(1 for outcome in outcomes if not isinstance(outcome, Exception)) == REQUESTS - len(failures)
    # Counted like any failure, and the traceback stays in the server's log, not in the answer.
    assert "At:" not in failures[0].message
    counted = lambda: value(scrape(faulty_server.metrics_url)[0], "pc_requests_failed_total", model=MODEL, err="engine_failure")
    deadline = time.monotonic() + 10
    while counted() < failures_before + len(failures) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counted() == failures_before + len(failures)
    with PatentClassifier(faulty_server.grpc_url, model=MODEL) as client:
        assert client.is_ready()
        assert client.classify(documents[0]).labels  # the first of a new run of three: not the failing one
