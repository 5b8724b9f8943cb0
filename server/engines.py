"""Build the engine a model's configuration names."""
from __future__ import annotations

from core.engine import ClassificationEngine
from core.serving_config import ServingConfig


def build_engine(config: ServingConfig) -> ClassificationEngine:
    # Imported on demand: each engine pulls in its own heavy stack (importing vLLM alone is slow).
    if config.engine == "torch":
        from server.torch_engine import TorchEngine

        return TorchEngine(config)
    if config.engine == "vllm":
        from server.vllm_engine import VllmEngine

        return VllmEngine(config)
    raise ValueError(f"engine: unknown engine {config.engine!r}")
