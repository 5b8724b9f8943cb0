"""Fuzzing request decoding: whatever arrives, the answer is a decoded request or an ``InvalidInput``
naming the field, never another exception (one would fail the whole execute() call). Found so
far: JSON nested deeper than Python's parser (RecursionError) and a float TOP_K holding NaN
(ValueError) escaped as untyped errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from patent_classifier_client import protocol
from patent_classifier_client.errors import InvalidInput
from patent_classifier_client.patent_document import MAX_DOCUMENT_BYTES, without_control_characters
from tests.conftest import MODEL_NAME
from tests.parity import probability_sum_slack

NUM_LABELS, MAX_DOCUMENTS, DEFAULT_TOP_K = 12, 4, 5
FIELDS = ("TEXT", "DOCUMENT", "TOP_K", "TEXT/DOCUMENT")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
documents = st.dictionaries(
    st.sampled_from(["ipc", "title", "abstract", "claims", "inventor"]),
    json_values | st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3), max_size=5,
).map(lambda payload: json.dumps(payload, ensure_ascii=False).encode())
byte_strings = (
    st.binary(max_size=48)
    | st.text(max_size=48).map(str.encode)
    | documents
    | st.integers(1, 20000).map(lambda depth: b"[" * depth)
    | st.just(b"x" * (MAX_DOCUMENT_BYTES + 1))
)
# What Triton hands the model: BYTES tensors as object arrays of bytes, of any shape; what a
# caller other than Triton might pass as well: elements that are not bytes at all.
elements = byte_strings | st.integers() | st.none() | st.text(max_size=8)
shapes = st.lists(st.integers(0, 5), min_size=1, max_size=2).map(tuple)
top_ks = st.none() | hnp.arrays(
    st.sampled_from([np.int32, np.int64, np.uint8, np.float32, np.bool_]), hnp.array_shapes(min_dims=1, max_dims=2, max_side=3)
)


@st.composite
def byte_tensors(draw):
    shape = draw(shapes)
    values = draw(st.lists(elements, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    tensor = np.empty(len(values), dtype=np.object_)
    tensor[:] = values
    return tensor.reshape(shape)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=st.none() | byte_tensors(), document=st.none() | byte_tensors(), top_k=top_ks)
def test_any_input_decodes_or_names_the_field(text, document, top_k):
    try:
        request = protocol.decode_request(
            text, document, top_k, num_labels=NUM_LABELS, max_documents=MAX_DOCUMENTS, default_top_k=DEFAULT_TOP_K
        )
    except InvalidInput as error:
        assert error.field.split("[")[0] in FIELDS and error.problem
        return
    assert 1 <= len(request.texts) <= MAX_DOCUMENTS
    assert all(isinstance(t, str) and t.strip() and t == without_control_characters(t) for t in request.texts)
    assert 1 <= request.top_k <= NUM_LABELS


# --- a smaller pass against the real server: raw KServe requests any client could send ---

datatypes = st.sampled_from(["BYTES", "INT32", "FP32"])
names = st.sampled_from(["TEXT", "DOCUMENT", "TOP_K"])


@st.composite
def raw_requests(draw):
    tensors = []
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        datatype = draw(datatypes)
        count = draw(st.integers(0, 5))
        if datatype == "BYTES":
            values = np.array(draw(st.lists(byte_strings, min_size=count, max_size=count)) or [], dtype=np.object_)
        else:
            dtype = np.int32 if datatype == "INT32" else np.float32
            values = np.array(draw(st.lists(st.integers(-300, 300), min_size=count, max_size=count)), dtype=dtype)
        tensors.append((name, datatype, values.reshape(count)))
    return tensors


@pytest.mark.server
@pytest.mark.parametrize("protocol_name", ["grpc", "http"])
def test_random_raw_requests_never_take_the_server_down(server, protocol_name):
    module = tritonclient.grpc if protocol_name == "grpc" else tritonclient.http
    client = module.InferenceServerClient(server.grpc_url if protocol_name == "grpc" else server.http_url)
    outcomes = {"answered": 0, "refused": 0}

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(raw_requests())
    def send(tensors):
        inputs = []
        for name, datatype, values in tensors:
            tensor = module.InferInput(name, list(values.shape), datatype)
            tensor.set_data_from_numpy(values)
            inputs.append(tensor)
        try:
            result = client.infer(MODEL_NAME, inputs, client_timeout=60) if protocol_name == "grpc" else client.infer(MODEL_NAME, inputs)
        except tritonclient.utils.InferenceServerException as error:
            # Refused by Triton (types, shapes) or by our decoder: always "your request is wrong".
            assert str(error.status()) in ("StatusCode.INVALID_ARGUMENT", "400"), error
            outcomes["refused"] += 1
            return
        codes, probabilities = result.as_numpy("LABEL_CODE"), result.as_numpy("PROBABILITY")
        assert codes.ndim == 2 and codes.shape[0] >= 1 and probabilities.shape == codes.shape
        assert np.all(np.diff(probabilities, axis=1) <= 0) and np.all(probabilities.sum(axis=1) <= 1 + probability_sum_slack(probabilities.shape[1]))
        outcomes["answered"] += 1

    try:
        send()
        assert outcomes["refused"] > 0
        assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    finally:
        client.close()  # an open HTTP connection holds Triton's shutdown until its exit timeout
