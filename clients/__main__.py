"""python -m clients: classify patents, evaluate a served model on a labelled set, or open the web page.

    python -m clients classify --input clients/examples/patents.jsonl [--output answers.jsonl]
        [--url 127.0.0.1:8001] [--protocol grpc|http] [--model kscst-gemma2] [--top-k 5]
    python -m clients evaluate --input clients/examples/labelled_patents.jsonl --out build/eval
        [--url ... | --start-server model_repository] [--model-dir model_repository/kscst-gemma2/1/model]
    python -m clients web [--url 127.0.0.1:8001] [--port 8501]

classify: each input line is a patent ({"ipc", "title", "abstract", "claims"}, plus an optional
"id") or {"text": "..."} with pre-formatted text. Each output line, in input order, carries the
line's "id" (or line number) and either the answer or {"error": {"kind", "message"}}: one bad
line never costs the others their answers.

evaluate: the same lines plus the true class code in "label"; writes report.json (accuracy,
macro-F1, top-k accuracy, per-class figures, confusion matrix), classification_report.txt,
confusion_matrix.png and predictions.jsonl into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from core import access_token
from core.errors import InvalidInput, ServingError
from clients.batch_classification import ServerAddress, classify_in_batches
from clients.patent_classifier import DEFAULT_MODEL, DEFAULT_URLS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WEB_PAGE_SCRIPT = Path(__file__).resolve().parent / "web_page.py"


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


def _progress(total: int, enabled: bool, description: str | None = None):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc=description, disable=not enabled, file=sys.stderr)


def _server_address(args: argparse.Namespace) -> ServerAddress:
    return ServerAddress(
        args.url or DEFAULT_URLS[args.protocol], args.protocol, args.model, args.timeout,
        tls=getattr(args, "tls", False), tls_ca=getattr(args, "tls_ca", None), token=getattr(args, "token", None),
    )


def classify_command(args: argparse.Namespace) -> int:
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with source:
        records = list(_read_lines(source))
    output = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    failures = 0
    progress = _progress(len(records), enabled=args.input != "-" and not args.quiet)
    batches = classify_in_batches(
        [document for _, document in records], _server_address(args), args.top_k, args.batch_size, args.concurrency
    )
    answers = (answer for batch in batches for answer in batch)
    with output:
        for (identifier, _), answer in zip(records, answers):
            if isinstance(answer, ServingError):
                failures += 1
                line = {"id": identifier, **_error_json(answer)}
            else:
                line = {"id": identifier, **answer.to_json()}
            output.write(json.dumps(line, ensure_ascii=False) + "\n")
            progress.update(1)
    progress.close()
    if failures:
        print(f"{failures} of {len(records)} documents failed; see their \"error\" lines", file=sys.stderr)
    return 1 if failures else 0


def evaluate_command(args: argparse.Namespace) -> int:
    from clients import evaluation

    try:
        samples = evaluation.read_labelled_patents(args.input)
    except (InvalidInput, OSError) as error:
        print(f"cannot evaluate: {error}", file=sys.stderr)
        return 2
    if args.start_server is None:
        address = _server_address(args)
        served = _classify_labelled(args, samples, address)
    else:
        address, served = _classify_on_own_server(args, samples)
    if served is None:
        return 1
    answers, seconds = served
    try:
        scored = evaluation.score_answers(
            samples, answers, args.top_k,
            input_name=str(args.input), model=address.model, server=f"{address.protocol} {address.url}", seconds=seconds,
        )
        offline_top1 = None
        if args.model_dir is not None:
            comparison, offline_top1 = evaluation.compare_with_offline(
                args.model_dir, samples, answers, args.max_length, args.offline_device, progress=not args.quiet
            )
            scored.report.offline = comparison
        written = evaluation.write_report(args.out, scored, samples, answers, offline_top1)
    except ServingError as error:
        print(f"cannot evaluate: {error}", file=sys.stderr)
        return 1
    _print_summary(scored.report, written)
    return 1 if scored.report.unanswered else 0


def _classify_on_own_server(args: argparse.Namespace, samples) -> tuple[ServerAddress, tuple | None]:
    """`make eval` from a fresh clone: no server is running, so start one on free loopback ports.

    It is stopped as soon as the documents are answered, before the offline model loads: a 9B
    model on one GPU has no room for a second copy."""
    from server.launcher import LaunchConfig, ServerNotReady, TritonServer, free_loopback_ports

    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    args.out.mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(
        model_repository=args.start_server, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
    )
    server = TritonServer(config, log_path=args.out / "tritonserver.log")
    url = server.grpc_url if args.protocol == "grpc" else server.http_url
    address = ServerAddress(url, args.protocol, args.model, args.timeout)
    print(f"starting tritonserver on {args.start_server} (log: {server.log_path}) ...", file=sys.stderr)
    try:
        server.start()
    except (ServerNotReady, FileNotFoundError) as error:
        print(f"server failed to start: {error}", file=sys.stderr)
        return address, None
    try:
        print(f"tritonserver ready in {server.startup_seconds:.1f} s at {url}", file=sys.stderr)
        return address, _classify_labelled(args, samples, address)
    finally:
        server.stop()


def _classify_labelled(args: argparse.Namespace, samples, address: ServerAddress) -> tuple[list, float] | None:
    """Every document's answer (or typed error) in input order, and the seconds it took."""
    with address.connect() as probe:
        if not probe.is_ready():
            print(f"cannot evaluate: model {address.model!r} is not ready at {address.url} ({address.protocol}); "
                  "start the server (make serve) or pass --start-server", file=sys.stderr)
            return None
    started = time.perf_counter()
    answers = []
    with _progress(len(samples), enabled=not args.quiet, description="served") as progress:
        for batch in classify_in_batches(
            [sample.document for sample in samples], address, args.top_k, args.batch_size, args.concurrency
        ):
            answers.extend(batch)
            progress.update(len(batch))
    return answers, time.perf_counter() - started


def _print_summary(report, written: list[Path]) -> None:
    rate = report.answered / report.seconds if report.seconds else float("nan")
    lines = [
        f"{report.answered} of {report.documents} patents answered by {report.model} ({report.server}) "
        f"in {report.seconds:.1f} s ({rate:.1f} patents/s)",
        f"accuracy          {report.accuracy:.4f}",
        f"macro-F1          {report.macro_f1:.4f}   (over {len(report.classes)} classes seen as label or prediction)",
        f"top-{report.top_k} accuracy    {report.top_k_accuracy:.4f}",
    ]
    if report.offline is not None:
        offline = report.offline
        lines.append(
            f"offline transformers: top-1 agreement {offline.top1_agreement:.4f}, accuracy {offline.offline_accuracy:.4f}, "
            f"max |Δprobability| {offline.max_probability_difference:.2e}"
        )
    if report.unanswered:
        lines.append(f"{len(report.unanswered)} patents were not answered; see report.json \"unanswered\"")
    lines.append("wrote " + ", ".join(str(path) for path in written))
    print("\n".join(lines))


def web_command(args: argparse.Namespace) -> int:
    """Run the Streamlit page; it calls the server through this client library."""
    classifier = _server_address(args)
    env = dict(os.environ)
    # Streamlit puts only the script's own folder on sys.path; the page imports `clients` and `core`.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "streamlit", "run", str(WEB_PAGE_SCRIPT),
        "--server.address", args.address,
        "--server.port", str(args.port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",  # no network calls out of the machine
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",  # no "Deploy" button: this page is served here, not on Streamlit's cloud
        "--",
        "--url", classifier.url,
        "--protocol", classifier.protocol,
        "--model", classifier.model,
        "--timeout", str(classifier.timeout_s),
        *(["--tls"] if classifier.tls else []),
        *(["--tls-ca", str(classifier.tls_ca)] if classifier.tls_ca else []),
    ]
    # The token goes to the page through its environment, never its command line (which `ps` shows).
    if classifier.token:
        env[access_token.TOKEN_ENV] = classifier.token
    print(f"web page: http://{args.address}:{args.port}  (classifier server: {classifier.protocol} {classifier.url})",
          file=sys.stderr, flush=True)
    # Become Streamlit, so that Ctrl-C and a supervisor's SIGTERM reach the page's process itself.
    os.execve(sys.executable, command, env)
    return 0  # not reached


def _add_server_arguments(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--url", default=None, help=f"host:port (default {DEFAULT_URLS['grpc']} for gRPC, {DEFAULT_URLS['http']} for HTTP)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=timeout_s, help="seconds per request")


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server against the system's CAs")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA certificate to verify the server with (implies --tls)")
    parser.add_argument(
        "--token-file", type=Path, default=None,
        help=f"file holding the server's access token (default: ${access_token.TOKEN_ENV} when set)",
    )


def _add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="documents per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify patents from a JSON-lines file")
    classify.add_argument("--input", default="-", help="JSON-lines file, or - for standard input")
    classify.add_argument("--output", default="-", help="JSON-lines file, or - for standard output")
    _add_server_arguments(classify, timeout_s=120.0)
    _add_security_arguments(classify)
    classify.add_argument("--top-k", type=int, default=None, help="classes per document (server default: 5)")
    _add_batching_arguments(classify)
    classify.set_defaults(run=classify_command)

    evaluate = commands.add_parser("evaluate", help="accuracy report of the served model on a labelled JSON-lines file")
    evaluate.add_argument("--input", type=Path, required=True, help='JSON-lines file: patents with their true class code in "label"')
    evaluate.add_argument("--out", type=Path, required=True, help="folder for report.json, classification_report.txt, confusion_matrix.png, predictions.jsonl")
    _add_server_arguments(evaluate, timeout_s=120.0)
    _add_security_arguments(evaluate)
    evaluate.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default 5)")
    _add_batching_arguments(evaluate)
    evaluate.add_argument(
        "--start-server", type=Path, default=None, metavar="MODEL_REPOSITORY",
        help="start tritonserver on this model repository on free loopback ports for the evaluation, then stop it",
    )
    evaluate.add_argument(
        "--model-dir", type=Path, default=None,
        help="merged model folder (e.g. model_repository/kscst-gemma2/1/model): also report agreement with offline transformers",
    )
    evaluate.add_argument("--max-length", type=int, default=512, help="tokens per document offline; must be the server's max_length")
    evaluate.add_argument("--offline-device", choices=["auto", "cpu", "cuda"], default="auto")
    evaluate.set_defaults(run=evaluate_command)

    web = commands.add_parser("web", help="the web page to try a patent (Streamlit), calling a running server")
    _add_server_arguments(web, timeout_s=60.0)
    _add_security_arguments(web)
    web.add_argument("--address", default="127.0.0.1", help="address the page binds to")
    web.add_argument("--port", type=int, default=8501)
    web.set_defaults(run=web_command)

    args = parser.parse_args(argv)
    if hasattr(args, "token_file"):
        try:
            args.token = access_token.read_token(args.token_file)
        except access_token.TokenError as exc:
            parser.error(str(exc))
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "concurrency", 1) < 1:
        parser.error("--batch-size and --concurrency must be at least 1")
    if args.command == "evaluate":
        if args.top_k < 1:
            parser.error("--top-k must be at least 1")
        if args.start_server is not None and args.url is not None:
            parser.error("give --url (a running server) or --start-server (start one), not both")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
