"""A Triton model for tests: the project's adapter (server/triton/model.py) over its real engine,
except that every third submission raises a plain exception, as a bug in an engine would."""
import itertools

import server.triton.model as served
from server.engines import build_engine

FAIL_EVERY = 3


class FaultyEngine:
    def __init__(self, engine):
        self._engine = engine
        self._submissions = itertools.count(1)

    def submit(self, texts, deadline=None, is_cancelled=None):
        if next(self._submissions) % FAIL_EVERY == 0:
            raise RuntimeError("an engine bug that is not a ServingError")
        return self._engine.submit(texts, deadline, is_cancelled)

    def __getattr__(self, name):
        return getattr(self._engine, name)


served.build_engine = lambda config: FaultyEngine(build_engine(config))
TritonPythonModel = served.TritonPythonModel
