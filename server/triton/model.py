"""Triton Python-backend adapter: requests in, engine calls, responses out. No model logic here.

The model is non-decoupled (so plain KServe v2 ``infer`` works over HTTP and gRPC) but answers
through each request's response sender instead of returning from ``execute``: ``execute``
hands requests to the engine and returns at once, so Triton keeps delivering new requests
while earlier ones compute, and the engine batches across them. ``server.request_dispatch``
sees that each request gets exactly one response and sends answers from a thread of its own,
so the engine loop never blocks on Triton's IPC.
"""
import json
import locale
import logging
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils

# The stub's embedded Python starts in the C locale whatever LANG or PYTHONUTF8 say, so open()
# without an encoding reads ASCII; torch's inductor, imported by vLLM, reads its UTF-8 templates
# that way and the vLLM engine fails to import.
locale.setlocale(locale.LC_CTYPE, "C.UTF-8")

from patent_classifier_client import protocol
from core.serving_config import ServingConfig
from server.dead_engine_exit import DeadEngineExit
from server.engines import build_engine
from server.model_instance import ModelInstance
from server.prediction_records import prediction_recorder
from server.request_dispatch import RequestDispatch
from server.token_check import TokenCheck
from server.triton_errors import error_response
from server.triton_metrics import TritonModelMetrics

log = logging.getLogger("patent_classifier.triton")


class TritonPythonModel:
    def initialize(self, args):
        self.token_check = TokenCheck.from_environment()
        model_config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        instance = ModelInstance.from_triton_args(args)
        self.config = instance.engine_config(ServingConfig.from_triton_parameters(model_config.get("parameters", {}), version_dir))
        self.engine = build_engine(self.config)
        self.engine.start()
        self.labels = self.engine.labels
        self.records = prediction_recorder(self.config, args["model_name"], args["model_version"], instance.name, self.labels)
        self.metrics = TritonModelMetrics(
            pb_utils, args["model_name"], self.labels.codes, self.engine, instance.name, self.records.stats
        )
        self.engine.observe_batches(self.metrics.batch)
        self.dispatch = RequestDispatch(self.engine, self.labels, _TritonReplies(), self.metrics, self.records)
        self.dead_engine_exit = DeadEngineExit(self.engine, self.dispatch.send_queued, engine_dead=self.metrics.engine_dead,
                                               quiesce=self._stop_talking_to_tritonserver)

    def execute(self, requests):
        for request in requests:
            self.dispatch.accept(request.get_response_sender(), lambda r=request: self._read(r))
        return None

    def _read(self, request):
        self.token_check.check(request.parameters())  # before anything of the request is decoded
        return self._decode(request), self._deadline(request)

    def _decode(self, request):
        return protocol.decode_request(
            _input(request, protocol.TEXT),
            _input(request, protocol.DOCUMENT),
            _input(request, protocol.TOP_K),
            num_labels=len(self.labels),
            max_documents=self.config.max_documents_per_request,
            default_top_k=self.config.default_top_k,
        )

    def _deadline(self, request):
        # KServe v2 "timeout" request parameter, in microseconds (tritonclient: infer(timeout=...)).
        timeout_us = request.timeout() or self.config.default_timeout_ms * 1000
        return time.monotonic() + timeout_us / 1e6 if timeout_us else None

    def _stop_talking_to_tritonserver(self):
        self.dispatch.close()
        self.metrics.stop()

    def finalize(self):
        self.dead_engine_exit.stop()
        self.engine.stop()
        self.dispatch.stop()
        self.records.stop()
        self.metrics.stop()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class _TritonReplies:
    """Final responses through a request's response sender (server.request_dispatch.Replies)."""

    def answer(self, sender, tensors):
        response = pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in tensors.items()])
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def refuse(self, sender, error):
        sender.send(error_response(pb_utils, error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
