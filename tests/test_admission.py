"""Overload and deadlines through the real server: refused at once with a status that says why,
nothing lost, the server still serving."""
import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from clients import AsyncPatentClassifier, PatentClassifier
from core.errors import DeadlineExceeded, Overloaded
from core.synthetic_patents import synthetic_patents
from tests.conftest import TIGHT_MODEL_NAME

LONG_PATENTS = synthetic_patents(12, seed=77, long_share=1.0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_overload_is_refused_fast_and_nothing_is_lost(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url

    async def burst():
        async with AsyncPatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME) as client:
            await client.classify(LONG_PATENTS[0])  # learn the model's shape before the burst

            async def one(document):
                started = time.monotonic()
                try:
                    return await client.classify(document), time.monotonic() - started
                except Overloaded as error:
                    return error, time.monotonic() - started

            return await asyncio.gather(*(one(d) for d in LONG_PATENTS))

    outcomes = asyncio.run(burst())
    answered = [seconds for outcome, seconds in outcomes if not isinstance(outcome, Overloaded)]
    refused = [(outcome, seconds) for outcome, seconds in outcomes if isinstance(outcome, Overloaded)]
    assert len(answered) + len(refused) == len(LONG_PATENTS)
    assert answered and refused
    assert all("max_queue_tokens=1024" in str(error) for error, _ in refused)
    assert max(seconds for _, seconds in refused) < max(answered)  # refusals did not wait for compute


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
        return await asyncio.gather(*(asyncio.to_thread(post) for _ in range(10)))

    statuses = asyncio.run(burst())
    assert {status for status, _ in statuses} == {200, 503}
    assert all("overloaded: queue full" in text for status, text in statuses if status == 503)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_that_cannot_make_its_deadline_gets_deadline_exceeded(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url

    async def scenario():
        async with AsyncPatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME) as busy:
            await busy.classify(LONG_PATENTS[0])
            backlog = asyncio.ensure_future(busy.classify(LONG_PATENTS[2]))
            await asyncio.sleep(0.05)
            async with AsyncPatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME, timeout_s=0.02) as hurried:
                with pytest.raises(DeadlineExceeded):
                    await hurried.classify(LONG_PATENTS[3])
            return await backlog

    answer = asyncio.run(scenario())
    assert answer.truncated  # the request ahead of it was still answered
    with PatentClassifier(url, protocol=protocol, model=TIGHT_MODEL_NAME) as client:
        assert client.is_ready() and client.classify(LONG_PATENTS[4]).token_count == 512
