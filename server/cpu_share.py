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

Within a stub, OpenMP's threads are the compute thread's alone (``on_a_thread_that_ends``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, TypeVar

T = TypeVar("T")

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


def on_a_thread_that_ends(work: Callable[[], T], name: str) -> T:
    """``work()`` on a new thread that has ended when this returns (its exception raised here).

    For the torch work an engine does before it serves (loading, packing weights, compiling):
    every thread that runs a parallel torch operator keeps an OpenMP team of its own for as long
    as it lives, and libgomp cuts its workers' spin-wait to a hundred iterations whenever it
    manages more threads than there are cores. Loaded on a thread that lives on (the stub's main
    thread), the compute thread's workers then go to sleep between operators and are woken for
    the next, and a forward pass takes longer (benchmarks/results/2026-11-30-precision.md). A
    thread's team ends with it."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as one_thread:  # leaving it joins the thread
        return one_thread.submit(work).result()


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
