"""What the server side shares (export/, server/, benchmarks/, tests/): the engine interface,
labels, the typed serving configuration and models file, the records store, and the model code
(HF loading, the packed Gemma-2 decoder, attention). What the server shares with its callers (the
wire protocol, the patent document and its template, the error table) lives once in the client
distribution, ``patent_classifier_client`` (clients/), and is imported from there."""
