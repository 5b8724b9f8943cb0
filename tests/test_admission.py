"""Overload and deadlines through the real server: refused at once with a status that says why,
nothing lost, the server still serving. The engine is held (server/engine_hold.py) while the
load arrives, so what fits in the queue and what does not is the same on any machine."""
import asyncio
import json
import urllib.error
import urllib.request

import pytest

from patent_classifier_client import AsyncPatentClassifier, PatentClassifier
from patent_classifier_client.errors import DeadlineExceeded, Overloaded
from core.synthetic_patents import synthetic_patents
from tests.conftest import TIGHT_MODEL_NAME, held_engines
from tests.waiting import until

pytestmark = pytest.mark.server  # every test here calls the real tritonserver

LONG_PATENTS = synthetic_patents(12, seed=77, long_share=1.0)
QUEUED = 2  # the tight-queue model admits two full-length patents (max_queue_tokens=1024)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_overload_is_refused_fast_and_nothing_is_lost(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url

    async def burst():
        async with AsyncPatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME) as client:
            await client.classify(LONG_PATENTS[0])  # learn the model's shape before the burst

            async def one(document):
                try:
                    return await client.classify(document)
                except Overloaded as error:
                    return error

            with held_engines():
                requests = [asyncio.ensure_future(one(d)) for d in LONG_PATENTS]
                # Refusals come back while the engine computes nothing: they never wait for compute.
                await until(lambda: sum(r.done() for r in requests) == len(LONG_PATENTS) - QUEUED, "the refusals")
            return await asyncio.gather(*requests)

    outcomes = asyncio.run(burst())
    refused = [outcome for outcome in outcomes if isinstance(outcome, Overloaded)]
    assert len(refused) == len(LONG_PATENTS) - QUEUED
    assert all(answer.token_count == 512 for answer in outcomes if not isinstance(answer, Overloaded))
    assert all("max_queue_tokens=1024" in str(error) for error in refused)


def test_overload_is_http_503_with_the_reason(server):
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [LONG_PATENTS[1].render()]}]})

    def post():
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/{TIGHT_MODEL_NAME}/infer", data=body.encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    async def burst():
        with held_engines():
            posts = [asyncio.ensure_future(asyncio.to_thread(post)) for _ in range(10)]
            await until(lambda: sum(p.done() for p in posts) == len(posts) - QUEUED, "the refusals")
        return await asyncio.gather(*posts)

    statuses = asyncio.run(burst())
    assert sorted(status for status, _ in statuses) == [200] * QUEUED + [503] * (10 - QUEUED)
    assert all("overloaded: queue full" in text for status, text in statuses if status == 503)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_that_cannot_make_its_deadline_gets_deadline_exceeded(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url

    async def scenario():
        async with AsyncPatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME) as busy:
            await busy.classify(LONG_PATENTS[0])
            with held_engines():  # nothing is computed before the hurried request's deadline
                backlog = asyncio.ensure_future(busy.classify(LONG_PATENTS[2]))
                async with AsyncPatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME, timeout_s=0.5) as hurried:
                    with pytest.raises(DeadlineExceeded):
                        await hurried.classify(LONG_PATENTS[3])
            return await backlog

    answer = asyncio.run(scenario())
    assert answer.truncated  # the request ahead of it was still answered
    with PatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME) as client:
        assert client.is_ready() and client.classify(LONG_PATENTS[4]).token_count == 512
