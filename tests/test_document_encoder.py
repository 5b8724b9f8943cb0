"""The tokenizing every engine shares (core/hf_classifier.py's DocumentEncoder): the token ids
transformers gives with truncation, for every family, and truncation detected without turning
the rest of a long text into Python objects."""
from __future__ import annotations

import tracemalloc

import pytest

from core.hf_classifier import DocumentEncoder, load_tokenizer
from core.synthetic_patents import synthetic_patents
from tests.conftest import KCBERT_MODEL, KOELECTRA_MODEL, LLAMA_MODEL, MAX_LENGTH

pytestmark = pytest.mark.model  # the demo models' tokenizers

TEXTS = [d.render() for d in synthetic_patents(24, seed=12, long_share=0.5)] + ["짧은 문장", "a", "", " \n\t", "😀 ㅋㅋㅋㅋ"]


@pytest.fixture(scope="module")
def tokenizer_folders(demo_models, family_demos):
    return {"gemma2": demo_models.base, **{name: paths.base for name, paths in family_demos.items()}}


@pytest.mark.parametrize("family", ["gemma2", LLAMA_MODEL, KCBERT_MODEL, KOELECTRA_MODEL])
@pytest.mark.parametrize("max_length", [8, 60, MAX_LENGTH])
def test_the_ids_are_transformers_truncated_ids_and_truncation_is_what_the_full_text_says(tokenizer_folders, family, max_length):
    folder = tokenizer_folders[family]
    encoded = DocumentEncoder(folder, max_length).encode(TEXTS)
    tokenizer = load_tokenizer(folder)
    assert [e.token_ids for e in encoded] == tokenizer(TEXTS, truncation=True, max_length=max_length)["input_ids"]
    assert [e.truncated for e in encoded] == [len(ids) > max_length for ids in tokenizer(TEXTS)["input_ids"]]
    assert any(e.truncated for e in encoded) and not all(e.truncated for e in encoded)


def python_memory_of_encoding(encoder: DocumentEncoder, text: str) -> int:
    """Peak bytes Python allocated while encoding ``text`` (the tokenizer's own Rust memory aside),
    after a first encoding of it: handing a str to Rust caches its UTF-8 bytes in the str, once."""
    encoder.encode([text])
    tracemalloc.start()
    try:
        (encoded,) = encoder.encode([text])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert encoded.truncated and len(encoded.token_ids) == MAX_LENGTH


def test_truncation_is_detected_without_materialising_the_overflow(tokenizer_folders):
    """What Python allocates for a truncated text does not grow with the text: a 256 KB patent costs
    what a patent past max_length costs, its 512 ids (with transformers' overflowing tokens it was
    hundreds of overflow rows of ids)."""
    encoder = DocumentEncoder(tokenizer_folders["gemma2"], MAX_LENGTH)
    patent = synthetic_patents(1, seed=13, long_share=1.0)[0].render()
    huge = patent * (256 * 1024 // len(patent.encode()) + 1)
    assert len(huge.encode()) > 256 * 1024
    small = python_memory_of_encoding(encoder, patent)
    large = python_memory_of_encoding(encoder, huge)
    assert large < 2 * small, (small, large)
