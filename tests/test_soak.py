"""A bounded soak against the real server: over 10 000 good and bad requests at high concurrency
over gRPC and HTTP, every one accounted for. (Bigger runs: python -m benchmarks.soak.)"""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.soak import bad_cases, run_soak
from patent_classifier_client import protocol
from tests.conftest import MODEL_NAME, TIGHT_MODEL_NAME

pytestmark = pytest.mark.server  # 10,000 requests against the real tritonserver

REQUESTS = 10_000


def test_soak_loses_nothing_and_every_bad_request_gets_its_error(server, reference):
    report, expected = run_soak(
        server.grpc_url, server.http_url, MODEL_NAME, overload_model=TIGHT_MODEL_NAME, requests=REQUESTS,
        concurrency=96, time_limit_s=300, request_timeout_s=60, good_share=0.25,
    )
    print("\nsoak:", report.summary())

    assert report.sent == REQUESTS and report.not_sent == 0
    assert report.hung == 0 and report.lost == 0, report.surprises
    assert report.good_wrong == 0 and report.bad_other_outcome == 0, report.surprises
    assert report.good_correct + report.overloaded + report.bad_refused_as_expected == REQUESTS
    assert report.good_correct > 0.2 * REQUESTS and report.bad_refused_as_expected > 0.7 * REQUESTS
    assert set(report.by_case) >= {case.name for case in bad_cases()} | {"good", "tight queue"}
    assert report.server_ready_after

    # The answers good requests were held to are the model's own (offline transformers).
    for text, answer in expected.items():
        probabilities, token_count = reference.probabilities(text)
        top = np.argsort(-probabilities, kind="stable")[:5]
        assert answer[protocol.LABEL_CODE][0].tolist() == [reference.labels.codes[i].encode() for i in top]
        reference.assert_matches(text, answer[protocol.PROBABILITY][0], classes=top)
        assert answer[protocol.TOKEN_COUNT][0] == token_count
