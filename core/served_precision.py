"""What a served model computes in: the serving field ``dtype`` resolved against the hardware and
against the export's agreement gate.

The export measures each precision a model may be served in against float32 on the same patents
and writes the figures beside the weights (``precision_report.json``, ``PrecisionReport``;
export/precision_agreement.py). The engine reads that report when it starts:

- ``int8`` and ``fp8`` are served only if the report accepted them for this model: a model
  exported without measuring them, or one whose answers they changed too often, refuses to load
  (``PrecisionRefused``), whatever config.pbtxt says; and only on hardware that computes them
  (``core.quantized_linear.check_hardware``);
- ``auto`` takes the fastest precision that the hardware computes and the report did not refuse:
  int8 on a CPU with VNNI (PyTorch engine, and only if the report accepted int8), else bf16 on a GPU
  or a CPU with native bf16, else float32. It never picks fp8, which is asked for explicitly;
- ``bfloat16``, ``float16`` and ``float32`` are served as asked (the export refuses an explicit bf16
  below the gate before it is ever written).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core import hf_classifier, quantized_linear

REPORT_FILENAME = "precision_report.json"
REFERENCE_DTYPE = "float32"
# Quantized precisions, and what the rest of the model (embedding, norms, attention, head) computes in.
QUANTIZED = {"int8": torch.float32, "fp8": torch.bfloat16}


class PrecisionRefused(RuntimeError):
    """A precision the agreement gate did not accept for this model."""


@dataclass(frozen=True)
class MeasuredPrecision:
    dtype: str
    top1_agreement: float  # share of the patents whose top class is float32's
    max_abs_probability_diff: float  # over every (patent, class)
    accuracy: float | None  # on the labelled patents (None without a labelled file)
    accuracy_change: float | None  # accuracy minus float32's on the same patents
    accepted: bool


@dataclass(frozen=True)
class PrecisionReport:
    reference_dtype: str
    device: str  # where the export computed both
    documents: int
    labelled_documents: int  # of ``documents``, those from the labelled file
    reference_accuracy: float | None  # float32's accuracy on the labelled patents
    min_top1_agreement: float
    measured: tuple[MeasuredPrecision, ...] = field(default_factory=tuple)
    serving_dtype: str = "auto"  # the dtype written into config.pbtxt

    def precision(self, dtype: str) -> MeasuredPrecision | None:
        return next((entry for entry in self.measured if entry.dtype == dtype), None)

    def accepts(self, dtype: str) -> bool:
        entry = self.precision(dtype)
        return dtype == REFERENCE_DTYPE or (entry is not None and entry.accepted)

    def refuses(self, dtype: str) -> bool:
        entry = self.precision(dtype)
        return entry is not None and not entry.accepted

    def describe(self, dtype: str) -> str:
        entry = self.precision(dtype)
        if entry is None:
            return f"{dtype} was not measured against float32 (export the model with dtype {dtype} or auto)"
        change = "" if entry.accuracy_change is None else f", accuracy change {entry.accuracy_change:+.1%}"
        return (
            f"{dtype} gives float32's top class on {entry.top1_agreement:.1%} of {self.documents} patents "
            f"(max |Δprobability| {entry.max_abs_probability_diff:.2g}{change}), "
            f"{'at or above' if entry.accepted else 'below'} min_top1_agreement {self.min_top1_agreement:.1%}"
        )

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / REPORT_FILENAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, model_dir: Path) -> "PrecisionReport | None":
        """The report beside the weights; None where the export wrote none."""
        path = Path(model_dir) / REPORT_FILENAME
        if not path.exists():
            return None
        values = json.loads(path.read_text(encoding="utf-8"))
        if "measured_dtype" in values:  # an export before int8: one precision, no accuracy
            entry = MeasuredPrecision(values["measured_dtype"], values["top1_agreement"], values["max_abs_probability_diff"],
                                      None, None, values["accepted"])
            return cls(values["reference_dtype"], values["device"], values["documents"], values["labelled_documents"], None,
                       values["min_top1_agreement"], (entry,) if values["documents"] else (), values["serving_dtype"])
        measured = tuple(MeasuredPrecision(**entry) for entry in values.pop("measured", []))
        return cls(**values, measured=measured)


def served_precision(dtype: str, device: torch.device, engine: str, report: PrecisionReport | None) -> str:
    """The precision an engine computes in (see the module's docstring); raises ``PrecisionRefused``
    or ``core.quantized_linear.PrecisionUnavailable`` for a quantized one it must not serve."""
    if dtype == "int8" and engine == "vllm":
        raise quantized_linear.PrecisionUnavailable(
            "dtype: int8 is the PyTorch engine's: vLLM runs int8 only from checkpoints quantized beforehand (docs/precision.md)")
    if dtype in QUANTIZED:
        if report is None or not report.accepts(dtype):
            why = "no precision_report.json beside the weights" if report is None else report.describe(dtype)
            raise PrecisionRefused(f"dtype {dtype} refused by the export's agreement gate: {why}")
        quantized_linear.check_hardware(dtype, device)
        return dtype
    if dtype != "auto":
        return dtype
    if engine == "torch" and device.type == "cpu" and quantized_linear.cpu_has_int8_dot_product() and report is not None and report.accepts("int8"):
        return "int8"
    native_bf16 = device.type == "cuda" or (device.type == "cpu" and hf_classifier.cpu_has_native_bf16())
    if native_bf16 and not (report is not None and report.refuses("bfloat16")):
        return "bfloat16"
    return REFERENCE_DTYPE


def compute_dtype(precision: str) -> torch.dtype:
    """The torch dtype of what a precision does not quantize (for float precisions: everything)."""
    return QUANTIZED.get(precision) or hf_classifier.DTYPES[precision]


def quantization(precision: str) -> str | None:
    return precision if precision in QUANTIZED else None
