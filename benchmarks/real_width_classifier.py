"""A Gemma-2 classifier of google/gemma-2-9b's real layer width with a trained head, for measuring
what int8 costs and changes where the matmuls have their real shapes (512 × 3584 × 14336).

The backbone is ``benchmarks.real_width_export``'s configuration (hidden 3584, MLP 14336, 16 heads
× 256, 8 KV heads, both softcaps, vocabulary 256,000) at ``--layers`` layers, random weights (σ 0.02).
A random head would leave its 188 classes nearly tied, which says nothing about a fine-tuned
classifier; so the head is trained, as a linear probe on the backbone's own pooled features:
each generated patent is about one of 30 subjects (core/synthetic_patents.py: its title names it),
subject k is class k of the KSCST labels, and a softmax regression (L-BFGS, L2) is fitted on
``--train`` patents. Beside the model, in ``make eval``'s format with their subject's class:
``labelled.jsonl``, the fitted patents (where the head is right and confident, as a fine-tuned
classifier is on most of its traffic), which the export measures int8 on, and ``held_out.jsonl``,
``--labelled`` patents it never saw. A random backbone carries little of a patent's subject to its
last token, so on those the probe is barely better than chance (``head_training.json``).

    python -m benchmarks.real_width_classifier --out build/demo/gemma2-9b-width [--layers 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import Gemma2ForSequenceClassification

from benchmarks.real_width_export import gemma2_9b_config
from patent_classifier_client.command_line import HelpFormatter
from core.hf_classifier import encode_texts
from core.labels import LabelSet
from core.synthetic_patents import _SUBJECTS, synthetic_patents
from export.demo_models import GEMMA_TOKENS, KSCST_LABELS_FILE, train_patent_tokenizer

TRAIN_SEED, LABELLED_SEED = 7, 8
# The patents the head was fitted on, where it is right and confident, as a fine-tuned classifier is
# on most of its traffic (the export measures int8 on them); and patents it never saw.
LABELLED_FILE, HELD_OUT_FILE = "labelled.jsonl", "held_out.jsonl"  # the export's own patents use other seeds: the head never saw any of them
SUFFIX = " 및 그 제조 방법"


def subject_of(document) -> int:
    """Which of the 30 subjects a generated patent is about: its title ends with it."""
    title = document.title.removesuffix(SUFFIX)
    return next(index for index, subject in enumerate(_SUBJECTS) if title.endswith(" " + subject))


@torch.inference_mode()
def pooled_features(model, tokenizer, documents, max_length: int) -> torch.Tensor:
    """The final-normed hidden state of each patent's last token: what the score head reads."""
    rows = []
    for item in encode_texts(tokenizer, [d.render() for d in documents], max_length):
        hidden = model.model(input_ids=torch.tensor([item.token_ids])).last_hidden_state
        rows.append(hidden[0, -1].float())
    return torch.stack(rows)


def fit_head(features: torch.Tensor, classes: torch.Tensor, labels: int, l2: float = 1e-3) -> torch.Tensor:
    """Softmax regression without bias (Gemma-2's score head has none), L-BFGS to convergence."""
    features = features.clone()  # made under inference_mode, which autograd cannot use
    weight = torch.zeros(labels, features.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(features @ weight.t(), classes) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach()


def write_labelled(path: Path, documents, labels: LabelSet) -> None:
    """`make eval`'s format: each patent with its subject's class."""
    with open(path, "w", encoding="utf-8") as handle:
        for number, document in enumerate(documents, start=1):
            record = {"id": f"{path.stem.upper()}-{number:04d}", "label": labels.codes[subject_of(document)],
                      "ipc": document.ipc, "title": document.title, "abstract": document.abstract, "claims": document.claims}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def build(out: Path, layers: int, train: int, labelled: int, max_length: int, seed: int = 0) -> dict:
    labels = LabelSet.read_tsv(KSCST_LABELS_FILE)
    tokenizer = train_patent_tokenizer(tokens=GEMMA_TOKENS)
    config = gemma2_9b_config(layers)
    config.architectures = ["Gemma2ForSequenceClassification"]
    config.num_labels, config.id2label = len(labels), labels.id2label()
    config.label2id = {code: index for index, code in config.id2label.items()}
    torch.manual_seed(seed)
    model = Gemma2ForSequenceClassification(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
        for norm in [m for m in model.modules() if type(m).__name__ == "Gemma2RMSNorm"]:
            norm.weight.zero_()  # Gemma's norms scale by (1 + weight): 0 is their initial, neutral value
    # Short patents mostly: the probe needs each subject's words, not 512 tokens of them, and long
    # patents cost ten times more; the held-out patents have the realistic mix.
    training = synthetic_patents(train, seed=TRAIN_SEED, long_share=0.3)
    features = pooled_features(model, tokenizer, training, max_length).clone()  # clone: usable outside inference mode
    classes = torch.tensor([subject_of(d) for d in training])
    head = fit_head(features, classes, len(labels))
    with torch.no_grad():
        model.score.weight.copy_(head)
    held_out = synthetic_patents(labelled, seed=LABELLED_SEED, long_share=0.7)
    held_out_features = pooled_features(model, tokenizer, held_out, max_length).clone()
    probabilities = torch.softmax(held_out_features @ head.t(), dim=-1)
    expected = torch.tensor([subject_of(d) for d in held_out])
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    write_labelled(out / LABELLED_FILE, training, labels)
    write_labelled(out / HELD_OUT_FILE, held_out, labels)
    return {
        "layers": layers, "train_patents": train, "labelled_patents": labelled,
        "train_accuracy": float(((features @ head.t()).argmax(-1) == classes).float().mean()),
        "held_out_accuracy": float((probabilities.argmax(-1) == expected).float().mean()),
        "held_out_median_top1_probability": float(probabilities.max(-1).values.median()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_width_classifier", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/demo/gemma2-9b-width"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train", type=int, default=48, help="patents the head is fitted on")
    parser.add_argument("--labelled", type=int, default=32, help="held-out patents written as the labelled file")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    summary = build(args.out, args.layers, args.train, args.labelled, args.max_length)
    (args.out / "head_training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
