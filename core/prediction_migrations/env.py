"""Alembic environment of the prediction records' schema.

Run only through ``core.prediction_store.PredictionStore.upgrade_schema``, which hands over a
connection already inside the transaction (and, on PostgreSQL, under the advisory lock) that the
upgrade runs in. A new revision is a file in ``versions/`` whose ``down_revision`` is the last
one; tests/test_prediction_store.py checks that the migrated schema equals ``METADATA``.
"""
from alembic import context

from core.prediction_store import METADATA

connection = context.config.attributes["connection"]
# SQLite alters a table only by copying it: batch mode does that, for later revisions.
context.configure(connection=connection, target_metadata=METADATA, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
