"""The served classifier, called the way the office's backend calls it, over gRPC and HTTP."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http

from patent_classifier_client import AsyncPatentClassifier, InvalidInput, PatentClassifier, PatentDocument
from patent_classifier_client.errors import ModelNotFound, ServerUnavailable
from core.labels import LabelSet
from core.synthetic_patents import synthetic_patents
from server.launcher import free_loopback_ports
from tests.conftest import MAX_LENGTH, MODEL_NAME, example_records

pytestmark = pytest.mark.server  # the demo models through the real tritonserver

PROTOCOLS = ["grpc", "http"]


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(params=PROTOCOLS)
def classifier(request, server):
    with PatentClassifier(url(server, request.param), protocol=request.param, model=MODEL_NAME) as client:
        yield client


def example_documents() -> list[PatentDocument]:
    return [PatentDocument.model_validate({k: v for k, v in record.items() if k != "id"}) for record in example_records()]


def served_probabilities(answer, labels: LabelSet) -> np.ndarray:
    """An answer with every label (top_k = all) as one probability per label, in label order."""
    served = np.zeros(len(labels), dtype=np.float32)
    for score in answer.labels:
        served[labels.codes.index(score.code)] = score.probability
    return served


def test_served_probabilities_equal_offline_transformers(classifier, reference):
    documents = example_documents() + synthetic_patents(12, seed=99, long_share=0.5)
    answers = classifier.classify_batch(documents, top_k=len(reference.labels))
    for document, answer in zip(documents, answers):
        expected, token_count = reference.probabilities(document.render())
        reference.assert_matches(document.render(), served_probabilities(answer, reference.labels))
        assert answer.labels[0].code == reference.labels.codes[int(expected.argmax())]
        assert answer.token_count == token_count


def test_long_patents_are_truncated_at_512_tokens_and_say_so(classifier, reference):
    long_document, short_document = synthetic_patents(1, seed=5, long_share=1.0)[0], synthetic_patents(1, seed=5, long_share=0.0)[0]
    assert reference.untruncated_length(long_document.render()) > MAX_LENGTH
    assert reference.untruncated_length(short_document.render()) < MAX_LENGTH

    long_answer, short_answer = classifier.classify_batch([long_document, short_document])

    assert (long_answer.token_count, long_answer.truncated) == (MAX_LENGTH, True)
    assert (short_answer.token_count, short_answer.truncated) == (reference.untruncated_length(short_document.render()), False)


def test_top_k_is_ordered_and_defaults_to_five(classifier):
    document = example_documents()[0]
    default = classifier.classify(document)
    three = classifier.classify(document, top_k=3)

    assert len(default.labels) == 5
    assert [s.code for s in three.labels] == [s.code for s in default.labels[:3]]
    probabilities = [s.probability for s in default.labels]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0.0 < p <= 1.0 for p in probabilities)
    assert default.labels[0].name.startswith("과학기술표준분류")


def test_preformatted_text_gets_the_same_answer_as_its_fields(classifier):
    document = example_documents()[1]
    from_fields = classifier.classify(document)
    from_text = classifier.classify(document.render())
    assert from_text == from_fields


def test_ipc_codes_may_come_as_one_string(classifier):
    record = {k: v for k, v in example_records()[2].items() if k != "id"}
    as_list = classifier.classify(record)
    as_string = classifier.classify({**record, "ipc": "; ".join(record["ipc"])})
    assert as_string == as_list


def test_a_new_application_without_ipc_is_classified_as_its_template_renders_it(classifier):
    record = {k: v for k, v in example_records()[3].items() if k not in ("id", "ipc")}
    without_ipc = classifier.classify(record)
    assert without_ipc == classifier.classify(PatentDocument.model_validate(record).render())
    assert not PatentDocument.model_validate(record).render().startswith("IPC")
    title_only = classifier.classify({"title": record["title"], "ipc": None})
    assert title_only == classifier.classify(f"발명의 명칭: {record['title']}")


def test_the_clis_example_lines_are_documents_for_the_library_as_they_are(classifier):
    """Before: `DOCUMENT[0].id: unknown field` for the lines of clients/examples/patents.jsonl."""
    records = example_records()
    assert all("id" in record for record in records)
    assert classifier.classify_batch(records) == classifier.classify_batch(example_documents())
    formatted = example_documents()[0].render()
    assert classifier.classify({"id": "T", "text": formatted}) == classifier.classify(formatted)


def test_control_characters_are_dropped_alike_from_fields_and_texts(classifier):
    record = {k: v for k, v in example_records()[4].items() if k != "id"}
    padded = {**record, "title": "\x00" + record["title"] + "\x00\x00", "abstract": record["abstract"] + "\x7f"}
    clean = classifier.classify(record)
    assert classifier.classify(padded) == clean
    assert classifier.classify("\x00" + PatentDocument.model_validate(record).render()) == clean


def test_empty_fields_of_a_database_export_are_classified_as_absent(classifier):
    """What a backend sends for a new application with its empty columns: the same answer as the
    document without those fields, probabilities and all; before, `DOCUMENT[0].ipc[0]: must not be empty`."""
    title = "자율주행 차량의 경로 계획 방법"
    with_empty = classifier.classify({"ipc": "", "title": title, "abstract": "", "claims": ""}, top_k=188)
    without = classifier.classify({"title": title}, top_k=188)
    assert with_empty.labels[0].code == without.labels[0].code
    assert [(s.code, s.probability) for s in with_empty.labels] == [(s.code, s.probability) for s in without.labels]
    nulls_and_blanks = classifier.classify({"ipc": [], "title": f" {title}\x00", "abstract": None, "claims": [" "]}, top_k=188)
    assert nulls_and_blanks == without


# (document, the field its error must name, a word its problem must contain)
BAD_DOCUMENTS = [
    ("", "TEXT[0]", "empty"),
    ("   ", "TEXT[0]", "empty"),
    ("\x00\x00\x00", "TEXT[0]", "empty"),
    ({"ipc": ["G06F 16/35"]}, "DOCUMENT[0]", "none of title, abstract, claims"),
    ({"ipc": "", "title": "", "abstract": "", "claims": ""}, "DOCUMENT[0]", "none of title, abstract, claims: the document has no text"),
    ({"title": "\x00 \x1f", "abstract": None, "claims": [" "]}, "DOCUMENT[0]", "none of title, abstract, claims"),
    ({"ipc": ["G06F"], "title": 123, "abstract": "요약", "claims": ["1. 장치"]}, "DOCUMENT[0].title", "string"),
    ({"ipc": ["G06F"], "title": "제목", "abstract": "요약", "claims": "1", "inventor": "x"}, "DOCUMENT[0].inventor", "unknown"),
]

GOOD_TEXT = np.array(["특허".encode()], dtype=np.object_)
# What a non-Python client can send: non-UTF-8 bytes, both inputs, a float TOP_K.
# (tensors as (name, datatype, value), the text its error must contain)
BAD_KSERVE_REQUESTS = [
    ([("TEXT", "BYTES", np.array([b"\xff\xfe patent"], dtype=np.object_))], "TEXT[0]: is not valid UTF-8"),
    ([("TEXT", "BYTES", GOOD_TEXT), ("DOCUMENT", "BYTES", GOOD_TEXT)], "TEXT/DOCUMENT: give exactly one"),
    ([("TOP_K", "INT32", np.array([3], dtype=np.int32))], "TEXT/DOCUMENT: give exactly one"),
    ([("DOCUMENT", "BYTES", np.array([b"{not json"], dtype=np.object_))], "DOCUMENT[0]: is not valid JSON"),
    ([("TEXT", "BYTES", GOOD_TEXT), ("TOP_K", "FP32", np.array([3.0], dtype=np.float32))], "TOP_K"),
]


def raw_infer(server, protocol: str, model: str, tensors):
    """One KServe v2 request built from raw tensors, with tritonclient as any client would."""
    module = tritonclient.grpc if protocol == "grpc" else tritonclient.http
    inputs = []
    for name, datatype, value in tensors:
        tensor = module.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = module.InferenceServerClient(url(server, protocol))
    try:
        return client.infer(model, inputs)
    finally:
        client.close()  # an open HTTP connection would hold the server's shutdown until its exit timeout


@pytest.mark.parametrize("document, field, limit_words", BAD_DOCUMENTS)
def test_bad_documents_get_errors_naming_the_field(classifier, document, field, limit_words):
    with pytest.raises(InvalidInput) as error:
        classifier.classify(document)
    assert error.value.field == field
    assert limit_words in error.value.problem


@pytest.mark.parametrize("top_k", [0, -1, 189])
def test_top_k_out_of_range_names_the_limit(classifier, top_k):
    with pytest.raises(InvalidInput, match=r"between 1 and 188") as error:
        classifier.classify("발명의 명칭: 장치", top_k=top_k)
    assert error.value.field == "TOP_K"


def test_the_server_refuses_more_documents_than_its_limit_in_one_request(server):
    for protocol in PROTOCOLS:
        with pytest.raises(Exception, match="TEXT: holds 65 documents; the limit is 64 per request"):
            raw_infer(server, protocol, MODEL_NAME, [("TEXT", "BYTES", np.array([b"x"] * 65, dtype=np.object_))])


def test_classify_batch_splits_any_number_of_documents_within_the_limit_and_keeps_order(classifier, monkeypatch):
    documents = synthetic_patents(70, seed=17, long_share=0.2)
    sent = []  # the size of each request the client sends; the server refuses any over its limit
    send = classifier._classify_request
    monkeypatch.setattr(classifier, "_classify_request", lambda chunk, top_k: sent.append(len(chunk)) or send(chunk, top_k))

    answers = classifier.classify_batch(documents)

    assert sent == [64, 6] and classifier.served_config().max_documents == 64
    assert len(answers) == 70
    # In order: each answer is its own document's (batched with others, so compared by what it says).
    picked = [0, 1, 62, 63, 64, 65, 68, 69]
    alone = [classifier.classify(documents[index]) for index in picked]
    assert [ranking(answers[index]) for index in picked] == [ranking(answer) for answer in alone]


def ranking(answer) -> tuple:
    return [score.code for score in answer.labels], answer.token_count, answer.truncated


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_asyncio_client_splits_too(server, protocol):
    documents = synthetic_patents(70, seed=17, long_share=0.2)

    async def run():
        async with AsyncPatentClassifier(url(server, protocol), protocol=protocol, model=MODEL_NAME) as client:
            return await client.classify_batch(documents), (await client.served_config()).max_documents

    answers, limit = asyncio.run(run())
    assert (len(answers), limit) == (70, 64)
    with PatentClassifier(url(server, protocol), protocol=protocol, model=MODEL_NAME) as client:
        assert [ranking(answer) for answer in answers[63:65]] == [ranking(client.classify(d)) for d in documents[63:65]]


def test_the_models_labels_are_its_classes(classifier, reference):
    assert classifier.served_config().num_labels == len(reference.labels) == 188
    assert classifier.model_labels() == dict(zip(reference.labels.codes, reference.labels.names))


@pytest.mark.parametrize("protocol, other_port, words", [
    ("grpc", "http", "answers, but not over grpc: it looks like the server's http port; use protocol http"),
    ("http", "grpc", "answers, but not over http: it looks like the server's grpc port; use protocol grpc"),
])
def test_the_wrong_port_or_protocol_is_named_as_the_likely_cause(server, protocol, other_port, words):
    with PatentClassifier(url(server, other_port), protocol=protocol, model=MODEL_NAME, timeout_s=10) as client:
        with pytest.raises(ServerUnavailable, match=words):
            client.classify("특허")


def test_nothing_listening_is_named_as_the_likely_cause():
    (port,) = free_loopback_ports(1)
    for protocol in PROTOCOLS:
        with PatentClassifier(f"127.0.0.1:{port}", protocol=protocol, model=MODEL_NAME, timeout_s=10) as client:
            with pytest.raises(ServerUnavailable, match=f"nothing listens at 127.0.0.1:{port}: is the server running"):
                client.classify("특허")


def test_unknown_model_is_model_not_found_naming_the_classifiers_the_server_has(server):
    for protocol in PROTOCOLS:
        with PatentClassifier(url(server, protocol), protocol=protocol, model="kscst-gemma") as client:
            with pytest.raises(ModelNotFound) as error:
                client.classify("특허")
        message = error.value.message
        assert message.startswith(f"{url(server, protocol)} serves no model 'kscst-gemma'; the classifiers it serves: ")
        assert MODEL_NAME in message.split("the classifiers it serves: ")[1].split(", ")
        assert "feedback" not in message and "\n" not in message


def test_a_model_that_is_not_a_classifier_is_refused_before_any_patent_is_sent(server):
    """`--model feedback` was taken, and every document then failed on the feedback model's inputs."""
    for protocol in PROTOCOLS:
        with PatentClassifier(url(server, protocol), protocol=protocol, model="feedback") as client:
            with pytest.raises(ModelNotFound, match=r"^model 'feedback' at \S+ is not a patent classifier \(it takes "
                               r"examiners' corrections\); the classifiers it serves: .*kscst-gemma2"):
                client.classify("특허")


@pytest.mark.parametrize("protocol, scheme", [("http", "http://"), ("grpc", "grpc://")])
def test_an_address_with_its_scheme_is_taken(server, protocol, scheme):
    with PatentClassifier(f"{scheme}{url(server, protocol)}/", protocol=protocol, model=MODEL_NAME) as client:
        assert client.url == url(server, protocol)
        assert client.classify("발명의 명칭: 장치").labels


def test_an_address_of_the_other_protocol_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"url: 'http://127.0.0.1:8000' is an HTTP address, but the protocol is grpc: "
                                         r"use protocol http \(--protocol http\)"):
        PatentClassifier("http://127.0.0.1:8000")


def test_the_metrics_port_is_named_as_the_likely_cause_in_one_line(server):
    """Before: rapidjson.JSONDecodeError out of tritonclient, not a ServingError."""
    metrics_address = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    with PatentClassifier(metrics_address, protocol="http", model=MODEL_NAME, timeout_s=10) as client:
        with pytest.raises(ServerUnavailable) as error:
            client.classify("특허")
    assert error.value.message.startswith(
        f"{metrics_address} answers over HTTP, but not as a KServe v2 server (its answer is not JSON): is it the server's metrics port?")
    assert "\n" not in error.value.message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_raw_kserve_requests_with_bad_bytes_and_types(server, protocol):
    for tensors, message in BAD_KSERVE_REQUESTS:
        with pytest.raises(Exception) as error:
            raw_infer(server, protocol, MODEL_NAME, tensors)
        assert message in str(error.value)
        assert error.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    # ... and the server still answers good requests.
    answer = raw_infer(server, protocol, MODEL_NAME, [("TEXT", "BYTES", GOOD_TEXT)])
    assert answer.as_numpy("LABEL_CODE").shape == (1, 5)


def test_concurrent_requests_each_get_their_own_answers(server, reference):
    """Requests from many threads share forward passes; every answer must still be its own."""
    documents = synthetic_patents(24, seed=11, long_share=0.5)
    expected = [reference.labels.codes[int(reference.probabilities(d.render())[0].argmax())] for d in documents]

    def classify(index: int) -> str:
        protocol = PROTOCOLS[index % 2]
        with PatentClassifier(url(server, protocol), protocol=protocol, model=MODEL_NAME) as client:
            return client.classify(documents[index]).labels[0].code

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(classify, range(len(documents)))) == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_asyncio_client(server, protocol):
    documents = example_documents()[:4]

    async def run():
        async with AsyncPatentClassifier(url(server, protocol), protocol=protocol, model=MODEL_NAME) as client:
            assert await client.is_ready()
            singles = await asyncio.gather(*(client.classify(document) for document in documents))
            batch = await client.classify_batch(documents)
            return singles, batch

    singles, batch = asyncio.run(run())
    assert singles == batch
