"""The baselines `make bench-batching` measures continuous batching against, as a Triton model:
the project's adapter (server/triton/model.py) with the same engine, except that ``execute``
computes exactly the requests Triton handed it, as one engine submission, and returns their
responses, as a model without an engine of its own would. With ``max_batch_size`` > 0 in its
config.pbtxt Triton's dynamic batcher groups requests into one ``execute`` (the
"triton-batcher" baseline, whose tensors carry Triton's leading batch dimension); with 0, each
``execute`` holds one request ("batch-1"). ``benchmarks.batching_comparison`` writes both.

Copied into a model's version folder as its model.py; imported only inside the stub (it needs
Triton's pb_utils).
"""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from patent_classifier_client import protocol
from patent_classifier_client.errors import EngineFailure, ServingError
from server.triton.model import TritonPythonModel as EngineModel
from server.triton_errors import error_response


class TritonPythonModel(EngineModel):
    def initialize(self, args):
        super().initialize(args)
        self.triton_batches = json.loads(args["model_config"]).get("max_batch_size", 0) > 0

    def execute(self, requests):
        received = time.monotonic()
        decoded, responses = {}, [None] * len(requests)
        for position, request in enumerate(requests):
            self.metrics.request_received()
            try:
                decoded[position] = self._decode(request)
            except Exception as exc:
                responses[position] = self._failed(exc, received)
        texts = [text for request in decoded.values() for text in request.texts]
        try:
            scores = self.engine.submit(texts).result() if texts else []
        except Exception as exc:
            return [response or self._failed(exc, received) for response in responses]
        start = 0
        for position, request in decoded.items():
            answer = scores[start : start + len(request.texts)]
            self.metrics.answered(answer, time.monotonic() - received)
            ids = self.records.record(request.texts, request.documents, answer, request.top_k)
            tensors = protocol.encode_answer(answer, self.labels, request.top_k, ids)
            responses[position] = pb_utils.InferenceResponse([
                pb_utils.Tensor(name, value[np.newaxis] if self.triton_batches else value) for name, value in tensors.items()
            ])
            start += len(request.texts)
        return responses

    def _failed(self, exc: Exception, received: float):
        error = exc if isinstance(exc, ServingError) else EngineFailure.internal(exc)
        self.metrics.failed(error.kind, time.monotonic() - received)
        return error_response(pb_utils, error)
