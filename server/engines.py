"""Build the engine a model's configuration names."""
from __future__ import annotations

from core.engine import ClassificationEngine
from core.serving_config import ServingConfig


def build_engine(config: ServingConfig) -> ClassificationEngine:
    if config.engine == "torch":
        from server.torch_engine import TorchEngine

        return TorchEngine(config)
    raise ValueError(f"engine: unknown engine {config.engine!r}")
