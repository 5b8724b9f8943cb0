"""The few commands of this package that borrow the server's side of the project: ``evaluate
--start-server`` starts a tritonserver, ``evaluate --model-dir`` loads the model in transformers,
``feedback export`` reads the records database through its schema. Those modules (``server``,
``core``) come with the project's checkout or server image, never with this distribution, which
stays light enough for an office's backend; without them the command says so in one line."""
from __future__ import annotations

import importlib
from types import ModuleType

from patent_classifier_client.errors import InvalidInput

SERVER_PACKAGES = ("core", "server")


def server_module(name: str, option: str) -> ModuleType:
    """The server-side module ``name``; ``InvalidInput`` naming ``option`` when only the client is installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        raise InvalidInput(
            option, "needs the server side of this project beside the client (its checkout after `make setup`, or the "
            "server image); pip install ./clients gives the client alone"
        ) from None
