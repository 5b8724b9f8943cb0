"""Code shared by export/, server/, clients/ and tests/: the patent document, labels,
the wire protocol, typed errors, the engine interface and its typed configuration.

Nothing here imports torch, so the client library installs without it."""
