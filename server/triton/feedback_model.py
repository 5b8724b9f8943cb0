"""Triton Python-backend adapter of the feedback model: corrections in, verdicts out, once committed.
The work is in server/feedback_service.py; the tensors in clients/patent_classifier_client/feedback_protocol.py.

A plain (non-decoupled) model: corrections are few and each is acknowledged only after the
database has committed it, so ``execute`` answers its requests in turn and returns. It loads
without the database, and answers UNAVAILABLE while the database is away.
"""
import json
import logging
from pathlib import Path

import triton_python_backend_utils as pb_utils

from patent_classifier_client import feedback_protocol
from patent_classifier_client.errors import EngineFailure, ServingError
from core.serving_config import FeedbackConfig
from server.feedback_service import FeedbackService
from server.token_check import TokenCheck
from server.triton_errors import error_response
from server.triton_metrics import TritonFeedbackMetrics

log = logging.getLogger("patent_classifier.feedback")


class TritonPythonModel:
    def initialize(self, args):
        self.token_check = TokenCheck.from_environment()
        parameters = json.loads(args["model_config"]).get("parameters", {})
        config = FeedbackConfig.from_triton_parameters(parameters, Path(args["model_repository"]) / args["model_version"])
        self.service = FeedbackService(config, TritonFeedbackMetrics(pb_utils))

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            self.token_check.check(request.parameters())
            inputs = {name: _input(request, name) for name, _, _ in feedback_protocol.INPUT_TENSORS}
            outputs = self.service.submit(inputs)
        except ServingError as error:
            return error_response(pb_utils, error)
        except Exception as error:  # a request that trips a bug gets an answer, and the next one is served
            log.exception("recording corrections failed")
            return error_response(pb_utils, EngineFailure.internal(error))
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in outputs.items()])

    def finalize(self):
        self.service.close()


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
