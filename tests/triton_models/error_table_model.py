"""A Triton model for tests: a request whose TEXT names an ``ErrorKind`` is answered with an
error of that kind, built as the served models build theirs (server/triton_errors.py) from the
one table (clients/patent_classifier_client/errors.py), so tritonserver turns it into the status it really sends."""
import triton_python_backend_utils as pb_utils

from patent_classifier_client.errors import ErrorKind, error_from_kind
from server.triton_errors import error_response

MESSAGE = "TEXT[0]: answered with this kind on purpose"


class TritonPythonModel:
    def execute(self, requests):
        kinds = [pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()[0].decode() for request in requests]
        return [error_response(pb_utils, error_from_kind(ErrorKind(kind), MESSAGE)) for kind in kinds]
