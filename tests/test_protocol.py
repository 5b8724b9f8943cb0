"""Request decoding and answer encoding, without a server."""
import json

import numpy as np
import pytest

from patent_classifier_client import protocol
from core.engine import DocumentScores
from patent_classifier_client.errors import InvalidInput
from core.labels import Label, LabelSet
from patent_classifier_client.patent_document import MAX_DOCUMENT_BYTES, TEXT_TEMPLATE, PatentDocument, without_control_characters
from patent_classifier_client.prediction_id import new_prediction_id


def texts(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=np.object_)


def decode(text=None, document=None, top_k=None, max_documents=4):
    return protocol.decode_request(text, document, top_k, num_labels=10, max_documents=max_documents, default_top_k=5)


def test_template_feeds_fields_in_training_order():
    document = PatentDocument(ipc="G06F 16/35; G06N 3/08", title="분류 장치", abstract="요약문", claims=["1. 장치", "2. 방법"])
    assert document.render() == "IPC: G06F 16/35, G06N 3/08\n발명의 명칭: 분류 장치\n요약: 요약문\n청구범위: 1. 장치\n2. 방법"
    assert TEXT_TEMPLATE.index("{ipc}") < TEXT_TEMPLATE.index("{title}") < TEXT_TEMPLATE.index("{abstract}") < TEXT_TEMPLATE.index("{claims}")


def test_absent_fields_leave_their_template_lines_out():
    assert PatentDocument(title="분류 장치", claims="1. 장치").render() == "발명의 명칭: 분류 장치\n청구범위: 1. 장치"
    assert PatentDocument.parse({"ipc": None, "abstract": "요약문", "claims": []}).render() == "요약: 요약문"
    assert PatentDocument.parse({"ipc": [], "title": "t"}).to_json() == {"title": "t"}


TITLE = "자율주행 차량의 경로 계획 방법"


@pytest.mark.parametrize("absent", ["", "   ", "\x00\x00\x00", " \t\n", None, [], [""], [" ", "\x00"]])
def test_empty_blank_null_and_empty_list_fields_mean_absent(absent):
    """A database export's empty columns: the document is the one without those fields."""
    payload = {"ipc": absent, "title": TITLE, "abstract": absent, "claims": absent}
    assert PatentDocument.parse(payload) == PatentDocument.parse({"title": TITLE})
    assert PatentDocument.parse(payload).render() == f"발명의 명칭: {TITLE}"


def test_blank_entries_of_a_list_are_dropped():
    document = PatentDocument.parse({"ipc": ["G06F 16/35", " "], "claims": ["1. 장치", "\x07\x1b", ""]})
    assert (document.ipc, document.claims) == (["G06F 16/35"], ["1. 장치"])
    assert PatentDocument.parse({"ipc": " ; ", "title": TITLE}).ipc == []


@pytest.mark.parametrize("payload", [
    {"ipc": "G06F 16/35"},
    {},
    {"ipc": "", "title": "", "abstract": "", "claims": ""},
    {"title": "\x00\x00\x00", "abstract": None, "claims": [" "]},
])
def test_a_document_without_text_gets_one_error_saying_so(payload):
    with pytest.raises(InvalidInput) as error:
        PatentDocument.parse(payload)
    assert error.value.field == "DOCUMENT"
    assert error.value.problem.startswith("holds none of title, abstract, claims: the document has no text")


def test_a_field_of_the_wrong_type_is_still_refused_naming_it():
    with pytest.raises(InvalidInput, match=r"DOCUMENT.title: must be a string, got int"):
        PatentDocument.parse({"title": 3, "abstract": "요약"})


def test_control_characters_are_removed_the_same_way_from_fields_and_texts():
    """C0/C1 controls go (NUL padding, DEL, escape), tab and newlines stay, in DOCUMENT and TEXT alike."""
    document = PatentDocument(title="\x00분류\t장치\x7f", abstract="요약\x1b문", claims="1.\r\n장치\x85")
    assert document.render() == "발명의 명칭: 분류\t장치\n요약: 요약문\n청구범위: 1.\r\n장치"
    request = decode(text=texts("\x00IPC: G06F\x9f\n발명의 명칭: 장치".encode()))
    assert request.texts == ["IPC: G06F\n발명의 명칭: 장치"]
    with pytest.raises(InvalidInput, match="TEXT\\[0\\]: is empty"):
        decode(text=texts("\x00\x01\x02 \x7f".encode()))
    assert [without_control_characters(chr(code)) for code in (9, 10, 13)] == ["\t", "\n", "\r"]
    assert "".join(without_control_characters(chr(code)) for code in [*range(0, 32), *range(127, 160)]) == "\t\n\r"


def test_a_request_document_with_empty_fields_decodes_like_the_one_without_them():
    with_empty = json.dumps({"ipc": "", "title": TITLE, "abstract": "", "claims": ""}, ensure_ascii=False).encode()
    without = json.dumps({"title": TITLE}, ensure_ascii=False).encode()
    assert decode(document=texts(with_empty)).texts == decode(document=texts(without)).texts == [f"발명의 명칭: {TITLE}"]
    all_empty = json.dumps({"ipc": "", "title": "", "abstract": "", "claims": ""}).encode()
    with pytest.raises(InvalidInput, match=r"^DOCUMENT\[1\]: holds none of title, abstract, claims: the document has no text"):
        decode(document=texts(without, all_empty))


def test_documents_decode_to_rendered_text_and_default_top_k():
    payload = {"ipc": ["A61K 31/00"], "title": "약학 조성물", "abstract": "요약", "claims": "1. 조성물"}
    request = decode(document=texts(json.dumps(payload, ensure_ascii=False).encode()))
    assert request.texts == [PatentDocument.model_validate(payload).render()]
    assert request.top_k == 5


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"text": texts()}, "TEXT", "at least 1"),
        ({"text": texts(b"a", b"b", b"c", b"d", b"e")}, "TEXT", "the limit is 4"),
        ({"text": texts(b"ok", b"\xc3\x28")}, "TEXT[1]", "not valid UTF-8"),
        ({"text": texts(b"x" * (MAX_DOCUMENT_BYTES + 1))}, "TEXT[0]", f"the limit is {MAX_DOCUMENT_BYTES} bytes"),
        ({"text": texts(b"ok"), "top_k": np.array([11], dtype=np.int32)}, "TOP_K", "between 1 and 10"),
        ({"text": texts(b"ok"), "top_k": np.array([1, 2], dtype=np.int32)}, "TOP_K", "exactly 1 value"),
        ({"document": texts(b"[1, 2]")}, "DOCUMENT[0]", "JSON object"),
        ({}, "TEXT/DOCUMENT", "exactly one"),
    ],
)
def test_bad_requests_name_the_field_and_the_limit(kwargs, field, words):
    with pytest.raises(InvalidInput) as error:
        decode(**kwargs)
    assert error.value.field == field
    assert words in error.value.problem


def test_answers_round_trip_with_ranked_labels():
    labels = LabelSet(tuple(Label(f"C{i}", f"class {i}") for i in range(4)))
    scores = [
        DocumentScores(np.array([0.1, 0.6, 0.1, 0.2], dtype=np.float32), token_count=7, truncated=False),
        DocumentScores(np.array([0.7, 0.1, 0.15, 0.05], dtype=np.float32), token_count=512, truncated=True),
    ]
    ids = [new_prediction_id(), new_prediction_id()]
    answers = protocol.decode_answer(protocol.encode_answer(scores, labels, top_k=2, prediction_ids=ids))
    assert [[s.code for s in a.labels] for a in answers] == [["C1", "C3"], ["C0", "C2"]]
    assert [a.prediction_id for a in answers] == ids
    assert answers[0].labels[0].name == "class 1"
    assert answers[1].labels[0].probability == pytest.approx(0.7)
    assert [(a.token_count, a.truncated) for a in answers] == [(7, False), (512, True)]


def test_ties_rank_in_label_order():
    scores = DocumentScores(np.array([0.25, 0.25, 0.25, 0.25], dtype=np.float32), 3, False)
    assert scores.top_k(3)[0].tolist() == [0, 1, 2]
