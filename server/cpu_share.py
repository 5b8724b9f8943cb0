"""How many CPU threads a model's PyTorch engine computes with (the serving field ``cpu_threads``).

Triton runs each model instance in its own stub process, and PyTorch gives each of them as many
OpenMP threads as there are cores. With several engines busy at once, or any other process on
the cores, threads outnumber cores; OpenMP's threads then wait on each other at every barrier
for a peer that is not running, and a forward pass takes many times longer
(benchmarks/results/2026-11-26-cpu-threads.md).
``auto`` therefore splits the cores among the engines the server runs on the CPU: every CPU
instance of every hosted model. Only the launcher knows how many that is (the models' Triton
configurations), and only the stub knows which cores it may use (``taskset``, a container's
cpuset), so the launcher passes the count to the stubs in their environment and each engine
divides its own cores by it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

CPU_ENGINES_ENV = "PATENT_CLASSIFIER_CPU_ENGINES"


def cpu_engines() -> int:
    """Engines sharing this machine's cores, as the launcher set it; 1 for an engine started another way."""
    value = os.environ.get(CPU_ENGINES_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${CPU_ENGINES_ENV}: is {value!r}; it must be a whole number, at least 1")
    return int(value)


def engine_cpu_threads(setting: int | Literal["auto"]) -> int:
    if setting != "auto":
        return setting
    return max(1, len(os.sched_getaffinity(0)) // cpu_engines())


def cpu_engines_of(config_pbtxt: Path) -> int:
    """Engines one model's ``config.pbtxt`` runs on the CPU: the instances of its ``instance_group``
    that are not GPU instances. KIND_MODEL counts (its engine may be on either), and so does
    KIND_AUTO (Triton's default, a GPU only when there is one): counting an engine that turns out
    to be on a GPU only leaves the others fewer threads than they could have."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_pbtxt.read_text(encoding="utf-8"), model_config_pb2.ModelConfig(), allow_unknown_field=True)
    if not config.instance_group:
        return 1  # Triton's default: one instance
    gpu = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
    return sum(max(1, group.count) for group in config.instance_group if group.kind != gpu)
