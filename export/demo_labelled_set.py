"""The labelled file ``make eval`` measures the demo model on: generated patents, labelled by the
demo model itself with deliberate, recorded noise.

The demo model has random weights, so no true class exists for any patent. Labels that only
reflect the model's own answers would give a report of 1.0 everywhere, which shows nothing;
random labels would give 0. Instead each patent's label comes from the merged demo model run
offline (transformers, float32, eager attention), and a known share is deliberately moved:

  ``model``       the offline model's most likely class                   (about 75 %)
  ``near_miss``   its second most likely class: wrong, but in the top 5    (about 15 %)
  ``wrong``       a class outside its five most likely                     (about 10 %)

So a served model that answers exactly as the offline one scores: accuracy = the ``model``
share, top-5 accuracy = the ``model`` + ``near_miss`` shares. Row i depends only on the seed
and i, so the first n rows of a longer file are the rows of a file of n.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.hf_classifier import class_logits, load_sequence_classifier, load_tokenizer, softmax
from core.labels import LabelSet
from core.synthetic_patents import synthetic_patents

LABEL_SOURCE_SHARES = (("model", 0.75), ("near_miss", 0.15), ("wrong", 0.10))
DEFAULT_SEED = 2026
DEFAULT_COUNT = 120
LONG_SHARE = 0.5  # half the patents run past the 512-token window, as many real ones do


@dataclass(frozen=True)
class LabelledRow:
    record: dict  # what the file holds: id, label and the patent's fields
    source: str  # which of LABEL_SOURCE_SHARES gave the label (not written to the file)


def _label_source(rng: random.Random) -> str:
    draw = rng.random()
    for source, share in LABEL_SOURCE_SHARES:
        if draw < share:
            return source
        draw -= share
    return LABEL_SOURCE_SHARES[-1][0]


def demo_labelled_rows(model_dir: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, max_length: int = 512) -> list[LabelledRow]:
    documents = synthetic_patents(count, seed=seed, long_share=LONG_SHARE)
    labels = LabelSet.for_model_dir(model_dir)
    model, tokenizer = load_sequence_classifier(model_dir), load_tokenizer(model_dir)
    probabilities = softmax(class_logits(model, tokenizer, [document.render() for document in documents], max_length))
    # Separate streams, so the noise does not depend on how many patents were generated.
    rng = random.Random(seed + 1)
    rows = []
    for index, (document, row_probabilities) in enumerate(zip(documents, probabilities)):
        ranked = np.argsort(-row_probabilities, kind="stable")
        source = _label_source(rng)
        if source == "model":
            label_index = int(ranked[0])
        elif source == "near_miss":
            label_index = int(ranked[1])
        else:
            label_index = int(rng.choice(ranked[5:]))
        record = {"id": f"DEMO-{index + 1:04d}", "label": labels.codes[label_index], **document.model_dump()}
        rows.append(LabelledRow(record, source))
    return rows


def write_demo_labelled_set(model_dir: Path, out: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[LabelledRow]:
    rows = demo_labelled_rows(model_dir, count, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row.record, ensure_ascii=False) + "\n")
    return rows
