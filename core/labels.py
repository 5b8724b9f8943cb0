"""The classes a classifier predicts: index → (code, name).

Labels travel with the merged model as ``labels.tsv`` (code, name, placeholder) and as the
``id2label`` of its ``config.json`` (codes only), so every engine, vLLM included, reports the
same codes. The TSV is the source of the human-readable names.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

LABELS_FILENAME = "labels.tsv"


@dataclass(frozen=True)
class Label:
    code: str
    name: str
    placeholder: bool = False  # the name is ours, waiting for the office's official one


@dataclass(frozen=True)
class LabelSet:
    labels: tuple[Label, ...]

    def __post_init__(self) -> None:
        codes = [label.code for label in self.labels]
        if not codes:
            raise ValueError("a label set needs at least one label")
        duplicates = sorted({code for code in codes if codes.count(code) > 1})
        if duplicates:
            raise ValueError(f"label codes must be unique; repeated: {duplicates[:5]}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Label:
        return self.labels[index]

    @property
    def codes(self) -> list[str]:
        return [label.code for label in self.labels]

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.codes))

    @classmethod
    def read_tsv(cls, path: Path) -> "LabelSet":
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        missing = {"code", "name"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{path}: label file needs a header with columns code, name (missing {sorted(missing)})")
        return cls(tuple(
            Label(row["code"].strip(), row["name"].strip(), row.get("placeholder", "").strip().lower() == "true")
            for row in rows
        ))

    def write_tsv(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["code", "name", "placeholder"])
            for label in self.labels:
                writer.writerow([label.code, label.name, str(label.placeholder).lower()])

    @classmethod
    def from_id2label(cls, id2label: dict) -> "LabelSet":
        """For a model shipped without a labels file: its config's id2label gives code and name."""
        ordered = sorted((int(index), str(code)) for index, code in id2label.items())
        if [index for index, _ in ordered] != list(range(len(ordered))):
            raise ValueError("id2label indices must be 0..num_labels-1")
        return cls(tuple(Label(code, code) for _, code in ordered))

    @classmethod
    def for_model_dir(cls, model_dir: Path) -> "LabelSet":
        labels_file = Path(model_dir) / LABELS_FILENAME
        if labels_file.exists():
            return cls.read_tsv(labels_file)
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return cls.from_id2label(config["id2label"])
