"""python -m clients classify: JSON lines in, JSON lines out.

    python -m clients classify --input clients/examples/patents.jsonl [--output answers.jsonl]
        [--url 127.0.0.1:8001] [--protocol grpc|http] [--model kscst-gemma2] [--top-k 5]

Each input line is a patent ({"ipc", "title", "abstract", "claims"}, plus an optional "id")
or {"text": "..."} with pre-formatted text. Each output line, in input order, carries the
line's "id" (or line number) and either the answer or {"error": {"kind", "message"}}: one bad
line never costs the others their answers.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from core.errors import InvalidInput, ServingError
from clients.patent_classifier import DEFAULT_MODEL, DEFAULT_URLS, PatentClassifier


def _read_lines(handle) -> Iterator[tuple[object, object]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, InvalidInput(f"line {number}", f"is not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            yield number, InvalidInput(f"line {number}", "must be a JSON object")
            continue
        identifier = record.pop("id", number)
        yield identifier, record.pop("text") if "text" in record and len(record) == 1 else record


def _error_json(error: ServingError) -> dict:
    return {"error": {"kind": error.kind.value, "message": error.message}}


def classify_command(args: argparse.Namespace) -> int:
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with source:
        records = list(_read_lines(source))
    output = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    local = threading.local()

    def client() -> PatentClassifier:
        if not hasattr(local, "client"):
            local.client = PatentClassifier(args.url, args.protocol, args.model, args.timeout)
        return local.client

    def classify_chunk(chunk: list[tuple[object, object]]) -> list[dict]:
        documents = [document for _, document in chunk]
        if any(isinstance(document, ServingError) for document in documents):
            return [classify_one(item) for item in chunk]
        try:
            answers = client().classify_batch(documents, args.top_k)
        except InvalidInput:
            return [classify_one(item) for item in chunk]  # find which line is bad; answer the rest
        except ServingError as error:
            return [{"id": identifier, **_error_json(error)} for identifier, _ in chunk]
        return [{"id": identifier, **answer.to_json()} for (identifier, _), answer in zip(chunk, answers)]

    def classify_one(item: tuple[object, object]) -> dict:
        identifier, document = item
        if isinstance(document, ServingError):
            return {"id": identifier, **_error_json(document)}
        try:
            return {"id": identifier, **client().classify(document, args.top_k).to_json()}
        except ServingError as error:
            return {"id": identifier, **_error_json(error)}

    chunks = [records[start : start + args.batch_size] for start in range(0, len(records), args.batch_size)]
    failures = 0
    progress = _progress(len(records), enabled=args.input != "-" and not args.quiet)
    with ThreadPoolExecutor(args.concurrency) as pool, output:
        for answers in pool.map(classify_chunk, chunks):  # map keeps input order
            for answer in answers:
                failures += "error" in answer
                output.write(json.dumps(answer, ensure_ascii=False) + "\n")
            progress.update(len(answers))
    progress.close()
    if failures:
        print(f"{failures} of {len(records)} documents failed; see their \"error\" lines", file=sys.stderr)
    return 1 if failures else 0


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", disable=not enabled, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify patents from a JSON-lines file")
    classify.add_argument("--input", default="-", help="JSON-lines file, or - for standard input")
    classify.add_argument("--output", default="-", help="JSON-lines file, or - for standard output")
    classify.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    classify.add_argument("--url", default=None, help=f"host:port (default {DEFAULT_URLS['grpc']} for gRPC, {DEFAULT_URLS['http']} for HTTP)")
    classify.add_argument("--model", default=DEFAULT_MODEL)
    classify.add_argument("--top-k", type=int, default=None, help="classes per document (server default: 5)")
    classify.add_argument("--batch-size", type=int, default=8, help="documents per request")
    classify.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    classify.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    classify.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.concurrency < 1:
        parser.error("--batch-size and --concurrency must be at least 1")
    return classify_command(args)


if __name__ == "__main__":
    sys.exit(main())
