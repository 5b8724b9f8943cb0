"""Triton Python-backend adapter: requests in, engine calls, responses out. No model logic here.

The model is non-decoupled (so plain KServe v2 ``infer`` works over HTTP and gRPC) but answers
through each request's response sender instead of returning from ``execute``: ``execute``
hands requests to the engine and returns at once, so Triton keeps delivering new requests
while earlier ones compute, and the engine batches across them. A dedicated thread sends the
answers, so the engine loop never blocks on Triton's IPC.
"""
import json
import locale
import logging
import queue
import threading
from pathlib import Path

import triton_python_backend_utils as pb_utils

# The stub's embedded Python starts in the C locale whatever LANG or PYTHONUTF8 say, so open()
# without an encoding reads ASCII; torch's inductor, imported by vLLM, reads its UTF-8 templates
# that way and the vLLM engine fails to import.
locale.setlocale(locale.LC_CTYPE, "C.UTF-8")

from core import protocol
from core.errors import ErrorKind, ServingError
from core.serving_config import ServingConfig
from server.engines import build_engine

_STOP = object()

log = logging.getLogger("patent_classifier.triton")


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.config = ServingConfig.from_triton_parameters(model_config.get("parameters", {}), version_dir)
        self.engine = build_engine(self.config)
        self.engine.start()
        self.labels = self.engine.labels
        self.answers = queue.Queue()
        self.answer_thread = threading.Thread(target=self._send_answers, name="triton-answers", daemon=True)
        self.answer_thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                decoded = protocol.decode_request(
                    _input(request, protocol.TEXT),
                    _input(request, protocol.DOCUMENT),
                    _input(request, protocol.TOP_K),
                    num_labels=len(self.labels),
                    max_documents=self.config.max_documents_per_request,
                    default_top_k=self.config.default_top_k,
                )
                future = self.engine.submit(decoded.texts)
            except ServingError as error:
                sender.send(_error_response(error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            future.add_done_callback(lambda done, s=sender, k=decoded.top_k: self.answers.put((s, done, k)))
        return None

    def _send_answers(self):
        while (item := self.answers.get()) is not _STOP:
            sender, future, top_k = item
            try:
                tensors = protocol.encode_answer(future.result(), self.labels, top_k)
                response = pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in tensors.items()])
            except ServingError as error:
                response = _error_response(error)
            except Exception as error:  # never leave a client waiting on an answer we failed to build
                log.exception("building an answer failed")
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {error}", pb_utils.TritonError.INTERNAL))
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.engine.stop()
        self.answers.put(_STOP)
        self.answer_thread.join(timeout=30)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _triton_error_code(kind: ErrorKind):
    """The one mapping from our error kinds to Triton's codes (Triton maps those to HTTP/gRPC status).

    Built on call: the stub adds ``TritonError`` to pb_utils only after model.py is imported."""
    codes = pb_utils.TritonError
    return {
        ErrorKind.INVALID_INPUT: codes.INVALID_ARG,
        ErrorKind.OVERLOADED: codes.UNAVAILABLE,
        ErrorKind.DEADLINE_EXCEEDED: codes.UNAVAILABLE,
        ErrorKind.CANCELLED: codes.CANCELLED,
        ErrorKind.MODEL_NOT_FOUND: codes.NOT_FOUND,
        ErrorKind.ENGINE_FAILURE: codes.INTERNAL,
        ErrorKind.UNAVAILABLE: codes.UNAVAILABLE,
    }[kind]


def _error_response(error: ServingError):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message, _triton_error_code(error.kind)))
