"""The vLLM engine (vLLM's async engine with its pooling runner) behind the real tritonserver, and
the exported model folder under `vllm serve`: the same answers as transformers, the same errors
as the PyTorch engine."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks.peers import vllm_serve_command, vllm_serve_process
from patent_classifier_client import AsyncPatentClassifier, InvalidInput, PatentClassifier
from patent_classifier_client.errors import Overloaded
from patent_classifier_client.patent_document import MAX_DOCUMENT_BYTES
from core.synthetic_patents import synthetic_patents
from server.launcher import free_loopback_ports
from tests.conftest import (
    MAX_LENGTH,
    MODEL_NAME,
    VLLM_GEMMA2_MODEL,
    VLLM_KV_CACHE_MIB,
    VLLM_LLAMA_MODEL,
    VLLM_MAX_QUEUE_TOKENS,
    OfflineReference,
    held_engines,
)
from tests.test_monitoring import scrape, value
from tests.test_serving import (
    BAD_DOCUMENTS,
    BAD_KSERVE_REQUESTS,
    GOOD_TEXT,
    example_documents,
    raw_infer,
    served_probabilities,
    url,
)

pytestmark = [pytest.mark.server, pytest.mark.vllm]  # the vLLM engine behind tritonserver, and vllm serve

# Which offline reference each vLLM-engine model must equal.
REFERENCES = {VLLM_GEMMA2_MODEL: "reference", VLLM_LLAMA_MODEL: "llama_reference"}


@pytest.fixture(params=list(REFERENCES))
def vllm_model(request, vllm_server) -> tuple[str, OfflineReference]:
    return request.param, request.getfixturevalue(REFERENCES[request.param])


def test_vllm_engine_probabilities_equal_offline_transformers(vllm_server, vllm_model):
    model, reference = vllm_model
    documents = example_documents() + synthetic_patents(12, seed=99, long_share=0.5)
    with PatentClassifier(vllm_server.grpc_url, protocol="grpc", model=model) as client:
        answers = client.classify_batch(documents, top_k=len(reference.labels))
    assert any(answer.truncated for answer in answers) and not all(answer.truncated for answer in answers)
    for document, answer in zip(documents, answers):
        expected, token_count = reference.probabilities(document.render())
        reference.assert_matches(document.render(), served_probabilities(answer, reference.labels))
        assert answer.labels[0].code == reference.labels.codes[int(expected.argmax())]
        assert answer.token_count == token_count


def test_over_long_input_is_truncated_and_reported_never_a_crash(vllm_server, vllm_model):
    model, reference = vllm_model
    long_document, short_document = synthetic_patents(1, seed=5, long_share=1.0)[0], synthetic_patents(1, seed=5, long_share=0.0)[0]
    # 147 KB, some 15,000 tokens: about 30 times vLLM's max_model_len, within the request's byte limit.
    sentence = long_document.render()
    huge_text = (sentence * (MAX_DOCUMENT_BYTES // len(sentence.encode())))[: MAX_DOCUMENT_BYTES // 4]
    assert reference.untruncated_length(huge_text) > 20 * MAX_LENGTH

    with PatentClassifier(vllm_server.grpc_url, protocol="grpc", model=model) as client:
        huge_answer = client.classify(huge_text)
        long_answer, short_answer = client.classify_batch([long_document, short_document])

    assert (huge_answer.token_count, huge_answer.truncated) == (MAX_LENGTH, True)
    assert huge_answer.labels[0].code == reference.labels.codes[int(reference.probabilities(huge_text)[0].argmax())]
    assert (long_answer.token_count, long_answer.truncated) == (MAX_LENGTH, True)
    assert (short_answer.token_count, short_answer.truncated) == (reference.untruncated_length(short_document.render()), False)


def test_bad_input_gets_the_same_errors_from_both_engines(server, vllm_server):
    """The PyTorch engine's model and the vLLM engine's serve the same Gemma-2: a user must not
    be able to tell them apart by their errors, over either protocol."""
    for protocol in ("grpc", "http"):
        for tensors, message in BAD_KSERVE_REQUESTS:
            errors = []
            for running, model in ((server, MODEL_NAME), (vllm_server, VLLM_GEMMA2_MODEL)):
                with pytest.raises(Exception) as error:
                    raw_infer(running, protocol, model, tensors)
                errors.append((error.value.status(), str(error.value).replace(model, "MODEL")))
            assert errors[0] == errors[1]
            assert message in errors[1][1]
        with PatentClassifier(url(server, protocol), protocol=protocol, model=MODEL_NAME) as torch_client, \
                PatentClassifier(url(vllm_server, protocol), protocol=protocol, model=VLLM_GEMMA2_MODEL) as vllm_client:
            for document, field, _ in BAD_DOCUMENTS:
                with pytest.raises(InvalidInput) as torch_error:
                    torch_client.classify(document)
                with pytest.raises(InvalidInput) as vllm_error:
                    vllm_client.classify(document)
                assert (vllm_error.value.field, vllm_error.value.problem) == (torch_error.value.field, torch_error.value.problem)
                assert vllm_error.value.field == field
            with pytest.raises(InvalidInput, match=r"between 1 and 188"):
                vllm_client.classify("발명의 명칭: 장치", top_k=189)
            with pytest.raises(Exception, match="TEXT: holds 65 documents; the limit is 64 per request"):
                raw_infer(vllm_server, protocol, VLLM_GEMMA2_MODEL, [("TEXT", "BYTES", np.array([b"x"] * 65, dtype=np.object_))])
            assert len(vllm_client.classify_batch(["특허"] * 65)) == 65  # the client splits within the limit
    # ... and the vLLM engine still answers good requests.
    assert raw_infer(vllm_server, "grpc", VLLM_GEMMA2_MODEL, [("TEXT", "BYTES", GOOD_TEXT)]).as_numpy("LABEL_CODE").shape == (1, 5)


def test_concurrent_requests_through_the_vllm_engine_each_get_their_own_answers(vllm_server, reference):
    """vLLM's scheduler packs documents of different requests into one step; answers must not mix."""
    documents = synthetic_patents(16, seed=12, long_share=0.5)
    expected = [reference.labels.codes[int(reference.probabilities(d.render())[0].argmax())] for d in documents]

    def classify(index: int) -> str:
        protocol = ("grpc", "http")[index % 2]
        with PatentClassifier(url(vllm_server, protocol), protocol=protocol, model=VLLM_GEMMA2_MODEL) as client:
            return client.classify(documents[index]).labels[0].code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(classify, range(len(documents)))) == expected


def test_the_vllm_engine_refuses_overload_and_loses_nothing(vllm_server, reference):
    """vLLM would queue without bound; the engine admits at most max_queue_tokens and refuses the
    rest with the PyTorch engine's Overloaded, while what it admitted is answered."""
    long_documents = synthetic_patents(60, seed=31, long_share=1.0)
    too_many = len(long_documents[:30]) * MAX_LENGTH
    assert too_many > VLLM_MAX_QUEUE_TOKENS
    for protocol in ("grpc", "http"):  # one request over the bound alone, whatever else is in flight
        with PatentClassifier(url(vllm_server, protocol), protocol=protocol, model=VLLM_GEMMA2_MODEL) as client:
            with pytest.raises(Overloaded, match=f"this request needs {too_many} more and the limit is "
                               f"max_queue_tokens={VLLM_MAX_QUEUE_TOKENS}; retry later"):
                client.classify_batch(long_documents[:30])

    admitted = VLLM_MAX_QUEUE_TOKENS // MAX_LENGTH

    async def burst() -> list:
        async with AsyncPatentClassifier(vllm_server.grpc_url, model=VLLM_GEMMA2_MODEL) as client:
            await client.classify(long_documents[0])  # the model's shape learnt before the burst
            # Held, the engine hands nothing to vLLM, so what it admitted stays admitted while the
            # burst arrives, however fast vLLM would answer (server/engine_hold.py).
            with held_engines():
                requests = [asyncio.ensure_future(client.classify(document)) for document in long_documents]
                deadline = time.monotonic() + 60
                while sum(r.done() for r in requests) < len(requests) - admitted and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            return await asyncio.gather(*requests, return_exceptions=True)

    outcomes = asyncio.run(burst())  # 60 full-length patents at once: 2.5 times what may be queued
    refused = [outcome for outcome in outcomes if isinstance(outcome, Overloaded)]
    answered = [(document, outcome) for document, outcome in zip(long_documents, outcomes) if not isinstance(outcome, Exception)]
    assert len(refused) == len(long_documents) - admitted and len(answered) == admitted  # nothing lost, no other error
    for document, answer in answered:
        assert answer.labels[0].code == reference.labels.codes[int(reference.probabilities(document.render())[0].argmax())]
    # The refused tokens were never counted, and the answered ones were released.
    with PatentClassifier(vllm_server.grpc_url, model=VLLM_GEMMA2_MODEL) as client:
        assert len(client.classify_batch(long_documents[:20])) == 20


def test_the_queue_gauges_count_what_the_vllm_engine_holds(vllm_server):
    """Under vLLM, pc_queue_documents and pc_queue_tokens count what is admitted and not yet
    answered (what admission counts). The engine is held before vLLM (server/engine_hold.py), so
    the requests stay admitted however fast the machine."""
    documents = synthetic_patents(3, seed=33, long_share=1.0)  # each cut at MAX_LENGTH tokens
    gauges = lambda: tuple(value(scrape(vllm_server.metrics_url)[0], name, model=VLLM_GEMMA2_MODEL)
                           for name in ("pc_queue_documents", "pc_queue_tokens"))

    def wait_for(expected: tuple[float, float]) -> tuple[float, float]:
        deadline = time.monotonic() + 30  # the gauges are sampled every second
        while (seen := gauges()) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen

    async def scenario():
        async with AsyncPatentClassifier(vllm_server.grpc_url, model=VLLM_GEMMA2_MODEL) as client:
            with held_engines():
                pending = [asyncio.ensure_future(client.classify_batch(documents[:2])),
                           asyncio.ensure_future(client.classify(documents[2]))]
                held = await asyncio.to_thread(wait_for, (3.0, 3.0 * MAX_LENGTH))
            return held, await asyncio.gather(*pending)

    assert wait_for((0.0, 0.0)) == (0.0, 0.0)
    held, (pair, single) = asyncio.run(scenario())
    assert held == (3.0, 3.0 * MAX_LENGTH)
    assert len(pair) == 2 and single.token_count == MAX_LENGTH
    assert wait_for((0.0, 0.0)) == (0.0, 0.0)  # answered: released
    assert value(scrape(vllm_server.metrics_url)[0], "pc_engine_startup_seconds", model=VLLM_GEMMA2_MODEL) > 0


def post_json(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def test_vllm_serve_on_the_exported_folder_gives_the_same_classes(exported, reference, tmp_path):
    (port,) = free_loopback_ports(1)
    command = vllm_serve_command(exported.merged_dir, "kscst-gemma2", port, MAX_LENGTH, VLLM_KV_CACHE_MIB)
    with vllm_serve_process(command, port, tmp_path / "vllm-serve.log"):
        # vLLM's /classify tokenizes itself, and refuses over-long input (HTTP 400) unless asked to truncate.
        texts = [document.render() for document in example_documents() + synthetic_patents(6, seed=21, long_share=0.5)]
        answer = post_json(
            f"http://127.0.0.1:{port}/classify",
            {"model": "kscst-gemma2", "input": texts, "truncate_prompt_tokens": MAX_LENGTH},
        )

    assert [item["index"] for item in answer["data"]] == list(range(len(texts)))
    token_counts = []
    for text, item in zip(texts, answer["data"]):
        expected, token_count = reference.probabilities(text)
        token_counts.append(token_count)
        assert item["num_classes"] == 188
        assert item["label"] == reference.labels.codes[int(expected.argmax())]
        reference.assert_matches(text, np.array(item["probs"]))
    assert MAX_LENGTH in token_counts  # some were truncated, and vLLM read the same tokens we do:
    assert answer["usage"]["prompt_tokens"] == sum(token_counts)
