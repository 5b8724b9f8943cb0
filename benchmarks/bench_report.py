"""The benchmark's figures and how they are written: JSON, a Markdown table, a PNG plot.

A *point* is one measurement (a configuration under one load: a closed-loop concurrency or an
open-loop arrival rate). A configuration's *best* point is its highest samples/s, among the
points whose p99 latency meets ``p99_bound_ms`` when one is given: throughput at a latency
bound is what decides how many machines to buy. Speedups compare best points.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load_generator import LoadResult

TRAINING_BASELINE_SAMPLES_PER_SECOND = 0.785  # the fine-tune's training throughput, the office's reference


@dataclass(frozen=True)
class Point:
    configuration: str
    result: LoadResult
    padding_waste: float | None  # None: not measured for this configuration (e.g. vLLM, which does not pad)

    @property
    def load(self) -> str:
        if self.result.mode == "open":
            return f"open {self.result.arrival_rate:g} req/s"
        return f"closed c={self.result.concurrency}"

    def row(self) -> dict:
        row = {"configuration": self.configuration, "load": self.load, **self.result.summary()}
        for key in ("p50_ms", "p95_ms", "p99_ms"):  # no answered request: no latency (JSON has no NaN)
            row[key] = None if math.isnan(row[key]) else row[key]
        row["padding_waste"] = None if self.padding_waste is None else round(self.padding_waste, 4)
        row["speedup_over_baseline"] = round(self.result.samples_per_second / TRAINING_BASELINE_SAMPLES_PER_SECOND, 2)
        return row


def best_points(points: list[Point], p99_bound_ms: float | None = None) -> dict[str, Point]:
    """Each configuration's highest-throughput point (within the p99 bound, when given)."""
    best: dict[str, Point] = {}
    for point in points:
        if point.result.documents == 0:
            continue
        if p99_bound_ms is not None and not point.result.latency_percentile_ms(99) <= p99_bound_ms:
            continue
        current = best.get(point.configuration)
        if current is None or point.result.samples_per_second > current.result.samples_per_second:
            best[point.configuration] = point
    return best


def speedups(best: dict[str, Point]) -> dict[str, dict[str, float]]:
    """speedups[a][b]: a's best samples/s over b's."""
    return {
        a: {b: round(pa.result.samples_per_second / pb.result.samples_per_second, 2) for b, pb in best.items() if b != a}
        for a, pa in best.items()
    }


def build_report(points: list[Point], startup_seconds: dict[str, float | None], p99_bound_ms: float | None,
                 machine: dict, settings: dict) -> dict:
    best = best_points(points, p99_bound_ms)
    return {
        "machine": machine,
        "settings": settings,
        "baseline_samples_per_second": TRAINING_BASELINE_SAMPLES_PER_SECOND,
        "p99_bound_ms": p99_bound_ms,
        "startup_seconds": {name: None if s is None else round(s, 1) for name, s in startup_seconds.items()},
        "points": [point.row() for point in points],
        "best": {name: point.row() for name, point in best.items()},
        "speedups": speedups(best),
    }


def _number(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def markdown(report: dict) -> str:
    names = list(report["best"])
    bound = f" with p99 ≤ {report['p99_bound_ms']:g} ms" if report["p99_bound_ms"] is not None else ""
    lines = [
        f"Best throughput per configuration{bound} (speedups: its samples/s over the column's):",
        "",
        "| configuration | samples/s | at load | p99 ms | × 0.785 baseline | " + " | ".join(f"× {n}" for n in names) + " |",
        "|---|---:|---|---:|---:|" + "---:|" * len(names),
    ]
    for name, row in report["best"].items():
        ratios = [("–" if other == name else f"{report['speedups'][name][other]:.2f}") for other in names]
        lines.append(f"| {name} | {_number(row['samples_per_second'], 2)} | {row['load']} | {_number(row['p99_ms'], 0)} | "
                     f"{row['speedup_over_baseline']:.1f} | " + " | ".join(ratios) + " |")
    with_mfu = "mfu" in report
    lines += [
        "",
        "Every point:",
        "",
        "| configuration | load | requests | failures | samples/s | tokens/s | p50 ms | p95 ms | p99 ms | padding waste | × 0.785 |"
        + (" MFU |" if with_mfu else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_mfu else ""),
    ]
    for row in report["points"]:
        waste = "–" if row["padding_waste"] is None else f"{100 * row['padding_waste']:.1f} %"
        lines.append(
            f"| {row['configuration']} | {row['load']} | {row['requests']} | {row['failures']} | "
            f"{_number(row['samples_per_second'], 2)} | {_number(row['tokens_per_second'], 0)} | {_number(row['p50_ms'], 0)} | "
            f"{_number(row['p95_ms'], 0)} | {_number(row['p99_ms'], 0)} | {waste} | {row['speedup_over_baseline']:.1f} |"
            + (f" {100 * row['mfu']:.1f} % |" if with_mfu else "")
        )
    starts = ", ".join(f"{name} {_number(s, 1)} s" for name, s in report["startup_seconds"].items())
    lines += ["", f"Start-up (model load, server ready): {starts}."]
    if report.get("dtypes"):
        lines.append("Precision: " + ", ".join(f"{name} {dtype}" for name, dtype in report["dtypes"].items()) + ".")
    for name, reason in report.get("refused", {}).items():
        lines.append(f"Refused, not measured: {name}: {reason}.")
    if with_mfu:
        flops = report["mfu"]
        ceilings = "; ".join(f"{dtype}: {c['matmul_tflops']:g} TFLOP/s ({c['matmul_method']})" for dtype, c in flops["ceilings"].items())
        lines.append(f"MFU: tokens/s × {flops['flop_per_token'] / 1e9:.3g} GFLOP per token + samples/s × "
                     f"{flops['flop_per_document'] / 1e9:.3g} GFLOP per document, over the matmul of each configuration's "
                     f"own precision measured in this run (benchmarks/model_flops.py): {ceilings}.")
    machine = report["machine"]
    if "load_average_1min" in machine:
        load = machine["load_average_1min"]
        lines.append(f"Machine: {machine['cpus']} CPUs, GPU {machine.get('gpu') or 'none'}; "
                     f"load average (1 min) {load['start']:.2f} at the start, {load['end']:.2f} at the end.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    names = list(dict.fromkeys(row["configuration"] for row in report["points"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(names):
        colour = colours[index % len(colours)]
        for mode, marker, style in (("closed", "o", "-"), ("open", "^", "")):
            rows = [r for r in report["points"] if r["configuration"] == name and r["mode"] == mode and r["p99_ms"] is not None]
            if rows:
                rows.sort(key=lambda r: (r["concurrency"], r["arrival_rate"] or 0))
                axes.plot([r["p99_ms"] for r in rows], [r["samples_per_second"] for r in rows], marker=marker,
                          linestyle=style, color=colour, label=f"{name} ({mode} loop)")
    axes.axhline(report["baseline_samples_per_second"], color="grey", linestyle="--", label="training baseline 0.785/s")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("p99 latency (ms)")
    axes.set_ylabel("samples/s")
    axes.set_title("Throughput against p99 latency")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(report: dict, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "bench.json", "markdown": folder / "bench.md", "plot": folder / "throughput_vs_p99.png"}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    try:
        plot(report, paths["plot"])
    except ImportError as missing:  # a bare GPU machine may lack matplotlib: keep the figures, say so
        print(f"no plot written ({missing}); the JSON and Markdown hold every figure", file=sys.stderr)
        del paths["plot"]
    return paths
