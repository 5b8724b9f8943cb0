"""A Triton model for tests: the project's adapter (server/triton/model.py) over its real PyTorch
engine, with a device fault injected on request: a file named ``fault`` beside this model.py
holding ``sticky`` (the next forward pass raises what a sticky CUDA error raises, and from then on
the device computes nothing, as a CUDA context poisoned by such an error does) or ``hang`` (the
next forward pass never returns). The file is consumed when the fault fires, so the model, once
reloaded by a new stub, serves normally."""
import threading
from pathlib import Path

import server.triton.model as served
from server import torch_engine
from server.engines import build_engine

FAULT_FILE = Path(__file__).with_name("fault")
STICKY_CUDA_ERROR = "CUDA error: an illegal memory access was encountered"

_device = {"computes": True}
_probe = torch_engine.device_computes
torch_engine.device_computes = lambda device: _device["computes"] and _probe(device)


def with_device_faults(engine):
    model = engine._logits

    def logits(batch):
        fault = FAULT_FILE.read_text().strip() if FAULT_FILE.exists() else None
        if fault:
            FAULT_FILE.unlink()
        if fault == "sticky":
            _device["computes"] = False
        if not _device["computes"]:
            raise RuntimeError(STICKY_CUDA_ERROR)
        if fault == "hang":
            threading.Event().wait()
        return model(batch)

    engine._logits = logits
    return engine


served.build_engine = lambda config: with_device_faults(build_engine(config))
TritonPythonModel = served.TritonPythonModel
