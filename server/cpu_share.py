"""How many CPU threads a model's PyTorch engine computes with (the serving field ``cpu_threads``).

Triton runs each model in its own stub process, and PyTorch gives each of them as many OpenMP
threads as there are cores. With several models busy at once, or any other process on the
cores, threads outnumber cores; OpenMP's threads then wait on each other at every barrier
for a peer that is not running, and a forward pass takes many times longer
(benchmarks/results/2026-11-26-cpu-threads.md).
``auto`` therefore splits the cores among the models the server hosts. Only the launcher knows
how many that is (the models file, or the repository's folders), and only the stub knows which
cores it may use (``taskset``, a container's cpuset), so the launcher passes the count to the
stubs in their environment and each engine divides its own cores by it.
"""
from __future__ import annotations

import os
from typing import Literal

HOSTED_MODELS_ENV = "PATENT_CLASSIFIER_HOSTED_MODELS"


def hosted_models() -> int:
    """Models sharing this machine's cores, as the launcher set it; 1 for an engine started another way."""
    value = os.environ.get(HOSTED_MODELS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${HOSTED_MODELS_ENV}: is {value!r}; it must be a whole number, at least 1")
    return int(value)


def engine_cpu_threads(setting: int | Literal["auto"]) -> int:
    if setting != "auto":
        return setting
    return max(1, len(os.sched_getaffinity(0)) // hosted_models())
