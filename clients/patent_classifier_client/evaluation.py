"""How well a served classifier does on a labelled set: the check the office runs before a model
goes to production (the Gemma model was validated on 20,559 labelled patents).

A labelled file is JSON lines; each line is a patent (``ipc``, ``title``, ``abstract``, ``claims``)
or ``{"text": ...}``, plus its true class code in ``"label"`` and an optional ``"id"``.

Metrics come from scikit-learn and the picture from matplotlib, imported only here, so that the
rest of the client library installs without them. Comparing with offline transformers needs
torch and is imported only when a model folder is given.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydantic import BaseModel

from patent_classifier_client.patent_lines import line_id
from patent_classifier_client.patent_document import json_object, patent_document
from patent_classifier_client.errors import InvalidInput, ServingError, error_from_kind
from patent_classifier_client.patent_document import PatentDocument
from patent_classifier_client.protocol import Classification
from patent_classifier_client.server_side import server_module

LABEL_FIELD = "label"
REPORT_FILE = "report.json"
CLASS_REPORT_FILE = "classification_report.txt"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
CONFUSED_PAIRS_FILE = "confused_pairs.txt"
PREDICTIONS_FILE = "predictions.jsonl"
# With 188 classes the picture shows where the confusion is, not which classes: the pairs say it in words.
CONFUSED_PAIRS = 20
# Beyond this many classes the numbers in the cells are unreadable; the colours still show the pattern.
MAX_CLASSES_WITH_CELL_VALUES = 25


@dataclass(frozen=True)
class LabelledPatent:
    identifier: object
    label: str
    document: PatentDocument | str  # structured fields, or already formatted text

    def model_input(self) -> str:
        """The text the model reads: the same template the server renders documents with."""
        return self.document if isinstance(self.document, str) else self.document.render()


def read_labelled_patents(path: Path) -> list[LabelledPatent]:
    """Every line must be valid: a metric over a silently shortened set would mislead."""
    samples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                samples.append(_parse_labelled_line(line, f"{Path(path).name} line {number}", number))
    if not samples:
        raise InvalidInput(str(path), "holds no labelled patents")
    return samples


def _parse_labelled_line(line: str, where: str, number: int) -> LabelledPatent:
    record = json_object(line, where)
    label = record.pop(LABEL_FIELD, None)
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput(f"{where}.{LABEL_FIELD}", "required: the true class code as a non-empty string")
    identifier = line_id(record, where, number)
    return LabelledPatent(identifier, label.strip(), patent_document(record, where))


def unknown_labels(samples: Sequence[LabelledPatent], model_codes: Iterable[str]) -> list[str]:
    """The file's labels that are no class of the model, sorted: a file for another model, or a typo."""
    return sorted({sample.label for sample in samples} - set(model_codes))


def most_confused_pairs(
    true_labels: Sequence[str], predicted: Sequence[str], names: dict[str, str], limit: int = CONFUSED_PAIRS
) -> list[dict]:
    """The (true, predicted) pairs of different classes the model mixes up most, most often first."""
    support = collections.Counter(true_labels)
    pairs = collections.Counter((t, p) for t, p in zip(true_labels, predicted) if t != p)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [
        {"true": t, "true_name": names.get(t, ""), "predicted": p, "predicted_name": names.get(p, ""),
         "documents": count, "share_of_true": count / support[t]}
        for (t, p), count in ranked
    ]


class OfflineComparison(BaseModel):
    """The served answers against the same merged model run offline in transformers, in float32:
    whatever precision the server computes in (bf16 where the hardware has it), this says how far
    its answers are from the full-precision ones, as the export's precision report does."""

    model_dir: str
    reference_dtype: str = "float32"
    documents: int
    top1_agreement: float  # share of documents whose served top class is the offline top class
    offline_accuracy: float
    max_probability_difference: float  # over every served (document, class) probability
    # The export's agreement report beside the weights (precision_report.json: each precision it
    # measured against float32, with its accuracy change), when there is one.
    export_precision: dict | None = None


class EvaluationReport(BaseModel):
    input: str
    model: str
    server: str  # "grpc 127.0.0.1:8001"
    documents: int
    answered: int
    unanswered: list[dict]  # {"id", "kind", "message"} of each document the server did not answer
    seconds: float
    accuracy: float
    macro_f1: float  # unweighted mean F1 over every class that occurs as a label or a prediction
    top_k: int
    top_k_accuracy: float
    classes: list[str]
    per_class: dict[str, dict]  # code -> precision, recall, f1-score, support (+ name where known)
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class, in ``classes`` order
    confused_pairs: list[dict]  # most_confused_pairs: true and predicted code and name, documents, share of the true class
    offline: OfflineComparison | None = None


@dataclass(frozen=True)
class ScoredAnswers:
    """The answered documents only, and the metrics scikit-learn computes on them."""

    report: EvaluationReport
    true_labels: list[str]
    predicted_labels: list[str]


def score_answers(
    samples: Sequence[LabelledPatent],
    answers: Sequence[Classification | ServingError],
    top_k: int,
    *,
    input_name: str,
    model: str,
    server: str,
    seconds: float,
    class_names: dict[str, str] | None = None,
) -> ScoredAnswers:
    """``class_names``: every class of the model, code → name (``PatentClassifier.model_labels``);
    without them, the names come from the answers."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, top_k_accuracy_score

    answered = [(sample, answer) for sample, answer in zip(samples, answers) if isinstance(answer, Classification)]
    if not answered:
        first = next(answer for answer in answers if isinstance(answer, ServingError))
        raise error_from_kind(first.kind, f"no document was answered; the first error: {first.message}")
    unanswered = [
        {"id": sample.identifier, "kind": answer.kind.value, "message": answer.message}
        for sample, answer in zip(samples, answers)
        if isinstance(answer, ServingError)
    ]
    short = [sample.identifier for sample, answer in answered if len(answer.labels) < top_k]
    if short:
        raise InvalidInput("top_k", f"the server returned fewer than {top_k} classes for {short[:3]}")
    true_labels = [sample.label for sample, _ in answered]
    predicted = [answer.labels[0].code for _, answer in answered]
    classes = sorted(set(true_labels) | set(predicted))
    names = {score.code: score.name for _, answer in answered for score in answer.labels} | (class_names or {})

    per_class = classification_report(true_labels, predicted, labels=classes, output_dict=True, zero_division=0)
    report = EvaluationReport(
        input=input_name,
        model=model,
        server=server,
        documents=len(samples),
        answered=len(answered),
        unanswered=unanswered,
        seconds=round(seconds, 3),
        accuracy=float(accuracy_score(true_labels, predicted)),
        macro_f1=float(f1_score(true_labels, predicted, labels=classes, average="macro", zero_division=0)),
        top_k=top_k,
        top_k_accuracy=_top_k_accuracy(true_labels, [answer for _, answer in answered], top_k, top_k_accuracy_score),
        classes=classes,
        per_class={code: _class_entry(per_class[code], names.get(code)) for code in classes},
        confusion_matrix=confusion_matrix(true_labels, predicted, labels=classes).tolist(),
        confused_pairs=most_confused_pairs(true_labels, predicted, names),
    )
    return ScoredAnswers(report, true_labels, predicted)


def _class_entry(figures: dict, name: str | None) -> dict:
    entry = {**figures, "support": int(figures["support"])}  # scikit-learn reports the count as a float
    return {**entry, "name": name} if name is not None else entry


def _top_k_accuracy(true_labels: list[str], answers: list[Classification], top_k: int, top_k_accuracy_score) -> float:
    """scikit-learn's top-k accuracy on a score matrix built from the served top-k answers.

    The server returns only the k best classes of each document; every other class scores 0 in
    that row. Softmax probabilities are never 0, so the k returned classes are exactly the row's
    k best and the ranking is the server's.
    """
    classes = set(true_labels) | {score.code for answer in answers for score in answer.labels}
    # Two columns would make scikit-learn read a binary problem; classes that never occur and
    # score 0 everywhere change no ranking.
    padding = [f"~unused-{index}" for index in range(max(0, 3 - len(classes)))]
    columns = sorted(classes | set(padding))
    column_of = {code: index for index, code in enumerate(columns)}
    scores = np.zeros((len(answers), len(columns)), dtype=np.float64)
    for row, answer in enumerate(answers):
        for score in answer.labels[:top_k]:
            scores[row, column_of[score.code]] = score.probability
    return float(top_k_accuracy_score(true_labels, scores, k=top_k, labels=columns))


def compare_with_offline(
    model_dir: Path,
    samples: Sequence[LabelledPatent],
    answers: Sequence[Classification | ServingError],
    max_length: int,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[OfflineComparison, list[str]]:
    """Run the merged model in transformers, in float32, on the answered documents; return the
    comparison and the offline top class of each of them.

    Loads through ``core.hf_classifier``, the one loader the export and the engine use, so
    Gemma-2 runs with eager attention (SDPA drops its attention softcapping).
    """
    from sklearn.metrics import accuracy_score
    from tqdm import tqdm

    loading = server_module("core.hf_classifier", "--model-dir")
    LabelSet = server_module("core.labels", "--model-dir").LabelSet
    import torch

    answered = [(sample, answer) for sample, answer in zip(samples, answers) if isinstance(answer, Classification)]
    labels = LabelSet.for_model_dir(model_dir)
    column_of = {code: index for index, code in enumerate(labels.codes)}
    unknown = sorted({score.code for _, answer in answered for score in answer.labels} - set(column_of))
    if unknown:
        raise InvalidInput("model_dir", f"{model_dir} has no class {unknown[0]} that the server returned: is it the served model?")

    torch_device = loading.resolve_device(device)
    model = loading.load_sequence_classifier(model_dir, dtype=torch.float32, device=torch_device)
    tokenizer = loading.load_tokenizer(model_dir)
    texts = [sample.model_input() for sample, _ in answered]
    chunk = 64  # progress granularity; class_logits batches inside each chunk
    rows = []
    with tqdm(total=len(texts), unit="doc", desc="offline transformers", disable=not progress) as bar:
        for start in range(0, len(texts), chunk):
            rows.append(loading.class_logits(model, tokenizer, texts[start : start + chunk], max_length, batch_size))
            bar.update(len(texts[start : start + chunk]))
    probabilities = loading.softmax(np.concatenate(rows))

    offline_top1 = [labels.codes[int(index)] for index in probabilities.argmax(axis=1)]
    served_top1 = [answer.labels[0].code for _, answer in answered]
    difference = max(
        abs(score.probability - float(probabilities[row, column_of[score.code]]))
        for row, (_, answer) in enumerate(answered)
        for score in answer.labels
    )
    comparison = OfflineComparison(
        model_dir=str(model_dir),
        documents=len(answered),
        top1_agreement=float(accuracy_score(offline_top1, served_top1)),
        offline_accuracy=float(accuracy_score([sample.label for sample, _ in answered], offline_top1)),
        max_probability_difference=difference,
        export_precision=_export_precision_report(model_dir),
    )
    return comparison, offline_top1


def _export_precision_report(model_dir: Path) -> dict | None:
    from core.served_precision import REPORT_FILENAME

    path = Path(model_dir) / REPORT_FILENAME
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def write_report(
    out_dir: Path,
    scored: ScoredAnswers,
    samples: Sequence[LabelledPatent],
    answers: Sequence[Classification | ServingError],
    offline_top1: Sequence[str] | None = None,
) -> list[Path]:
    """report.json, classification_report.txt, confusion_matrix.png, confused_pairs.txt and predictions.jsonl."""
    from sklearn.metrics import classification_report

    out_dir.mkdir(parents=True, exist_ok=True)
    report = scored.report
    (out_dir / REPORT_FILE).write_text(json.dumps(report.model_dump(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    text_report = classification_report(
        scored.true_labels, scored.predicted_labels, labels=report.classes, digits=4, zero_division=0
    )
    (out_dir / CLASS_REPORT_FILE).write_text(text_report, encoding="utf-8")
    plot_confusion_matrix(
        scored.true_labels,
        scored.predicted_labels,
        report.classes,
        out_dir / CONFUSION_MATRIX_FILE,
        title=f"{report.model}: {report.answered} patents, accuracy {report.accuracy:.3f}",
    )
    (out_dir / CONFUSED_PAIRS_FILE).write_text(confused_pairs_table(report.confused_pairs), encoding="utf-8")
    offline = iter(offline_top1 or [])
    with open(out_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
        for sample, answer in zip(samples, answers):
            line: dict = {"id": sample.identifier, "label": sample.label}
            if isinstance(answer, ServingError):
                line["error"] = {"kind": answer.kind.value, "message": answer.message}
            else:
                line["predicted"] = [score.code for score in answer.labels]
                line["probabilities"] = [score.probability for score in answer.labels]
                line["correct"] = answer.labels[0].code == sample.label
                if offline_top1 is not None:
                    line["offline_top1"] = next(offline)
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    return [out_dir / name for name in (REPORT_FILE, CLASS_REPORT_FILE, CONFUSION_MATRIX_FILE, CONFUSED_PAIRS_FILE, PREDICTIONS_FILE)]


def confused_pairs_table(pairs: list[dict]) -> str:
    """The pairs as a plain-text table, class names beside their codes, to read beside the picture."""
    if not pairs:
        return "No document was given a class other than its label.\n"
    header = ("documents", "share", "true class", "predicted as")
    rows = [
        (str(pair["documents"]), f"{pair['share_of_true']:.0%}",
         f"{pair['true']} {pair['true_name']}".strip(), f"{pair['predicted']} {pair['predicted_name']}".strip())
        for pair in pairs
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in [header, *rows]]
    title = f"The {len(pairs)} most confused pairs (share: of the true class's documents)"
    return "\n".join([title, *lines]) + "\n"


def plot_confusion_matrix(true_labels: list[str], predicted: list[str], classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    side = min(40.0, max(6.0, 0.22 * len(classes) + 3))  # inches: readable tick labels up to 188 classes
    figure, axes = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay.from_predictions(
        true_labels,
        predicted,
        labels=classes,
        include_values=len(classes) <= MAX_CLASSES_WITH_CELL_VALUES,
        xticks_rotation="vertical",
        cmap="Blues",
        ax=axes,
        colorbar=True,
    )
    axes.set_title(title)
    tick_size = 10 if len(classes) <= MAX_CLASSES_WITH_CELL_VALUES else 6
    axes.tick_params(labelsize=tick_size)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
