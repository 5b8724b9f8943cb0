"""patent-classify (also python -m patent_classifier_client): classify patents, evaluate a served model on a
labelled set, open the web page, or submit and export examiners' corrections.

    patent-classify classify --input clients/examples/patents.jsonl [--output answers.jsonl [--resume]]
        [--url 127.0.0.1:8001[,host2:8001...] | --url dns:///name:8001] [--protocol grpc|http] [--model kscst-gemma2] [--top-k 5]
        [--shard I/N]
    patent-classify shards check --input backlog.jsonl --outputs answers-0.jsonl answers-1.jsonl ...
    patent-classify evaluate --input clients/examples/labelled_patents.jsonl --out build/eval
        [--url ... | --start-server model_repository] [--min-accuracy 0.8]
        [--model-dir model_repository/kscst-gemma2/1/model]
    patent-classify web [--url 127.0.0.1:8001] [--port 8501]
    patent-classify feedback submit --input corrections.jsonl [--output verdicts.jsonl] [--url 127.0.0.1:8001]
    patent-classify feedback export --database sqlite:///build/prediction-records.db --out corrected.jsonl [--model NAME]

classify: each input line is a patent ({"ipc", "title", "abstract", "claims"}, ipc optional, plus
an optional "id") or {"text": "..."} with pre-formatted text. Each output line carries the line's
"id" (or line number; ids must be unique) and either the answer or {"error": {"kind", "message"}},
the message naming the input line and the field: one bad line never costs the others their
answers. Lines are written in input order as their batches are answered; with --resume a run
continues its output file, skipping the ids answered there and redoing its error lines, so an
interrupted backlog loses nothing and repeats nothing. Several --url addresses (or a dns:/// name)
spread the requests over the replicas, and a request one replica could not take goes to another
(clients/patent_classifier_client/replicas.py). --shard I/N answers only shard I of N of the input (each line's shard
follows from its id; clients/patent_classifier_client/shards.py), so N workers split a backlog, each with its own output
file; `shards check` then verifies the N outputs answer every line exactly once.

evaluate: the same lines plus the true class code in "label"; refuses a file whose labels are not
the model's classes; writes report.json (accuracy, macro-F1, top-k accuracy, per-class figures,
confusion matrix, most confused pairs), classification_report.txt, confusion_matrix.png,
confused_pairs.txt and predictions.jsonl into --out. It loads no model itself unless given --model-dir.

feedback submit: each line is {"prediction_id", "label", "examiner_id"?, "comment"?} (the label is
the class that is right for the classified document); each output line, in input order, carries
the prediction_id and its "verdict" (correct, wrong) or the error. feedback export: the corrected
examples whose text was recorded, as the fine-tune reads them (ipc, title, abstract, claims, label);
it reads the records database and never creates or changes it.

A mistake of the user's (a missing file, a bad option, an unknown model, an unreachable server) is
one line on standard error and an exit code: 0 done; 1 some documents or corrections failed (their
lines say why), or accuracy under --min-accuracy; 2 bad input or options (nothing sent); 3 the
server (or the records database) cannot be used. The table of every case: docs/clients.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from patent_classifier_client import access_token
from patent_classifier_client.command_line import HelpFormatter
from patent_classifier_client.errors import AccessDenied, InvalidInput, ModelNotFound, ServerUnavailable, ServingError
from patent_classifier_client.answers_file import AnswersFile, id_key
from patent_classifier_client.batch_classification import ServerAddress, classify_in_batches
from patent_classifier_client.replicas import parse_targets
from patent_classifier_client.server_side import server_module
from patent_classifier_client import shards
from patent_classifier_client.patent_classifier import DEFAULT_MODEL, DEFAULT_URLS, without_scheme
from patent_classifier_client.patent_lines import at_line, read_patent_lines

PACKAGE_FOLDER = Path(__file__).resolve().parent.parent  # what holds this package: site-packages, or clients/ in the checkout
WEB_PAGE_SCRIPT = Path(__file__).resolve().parent / "web_page.py"


# Exit codes of every command (docs/clients.md#exit-codes has the table of cases).
EXIT_SOME_FAILED = 1  # some documents or corrections got an error line, or the accuracy is under the gate
EXIT_BAD_INPUT = 2  # the input or the options are wrong; nothing was sent
EXIT_UNREACHABLE = 3  # the server (or database) cannot be used: address, protocol, token, model, not reachable
# Errors about the server, not a document: going on would only write the same error for every line.
_SERVER_ERRORS = (ServerUnavailable, AccessDenied, ModelNotFound)


class _ArgumentParser(argparse.ArgumentParser):
    """A bad option is one line and exit 2, like every other user error of this command."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}\n")


def _program_name() -> str:
    """The command as the user typed it: the installed `patent-classify`, or `python -m patent_classifier_client`."""
    return "patent-classify" if Path(sys.argv[0]).name == "patent-classify" else "python -m patent_classifier_client"


def _error_json(error: ServingError) -> dict:
    return {"error": {"kind": error.kind.value, "message": error.message}}


def _server_problem(address: ServerAddress, error: ServingError, doing: str = "cannot reach") -> str:
    """One line saying why the server cannot be used; an unknown model's message names the models there are."""
    if isinstance(error, ModelNotFound):
        return error.message
    return f"{doing} model {address.model!r} at {address.url} ({address.protocol}): {error.message}"


def _file_problem(path: str | Path, option: str, writing: bool = False) -> str | None:
    """Why ``path`` cannot be read (or written, in a folder that exists), or None; "-" is a standard stream."""
    if str(path) == "-":
        return None
    path = Path(path)
    if writing:
        if path.is_dir():
            return f"{option} {path}: is a folder; give a file in it"
        if not path.parent.is_dir():
            return f"{option} {path}: the folder {path.parent} does not exist"
        return None if os.access(path.parent, os.W_OK) else f"{option} {path}: the folder {path.parent} is not writable"
    if not path.exists():
        return f"{option} {path}: no such file"
    if path.is_dir():
        return f"{option} {path}: is a folder, not a file"
    return None if os.access(path, os.R_OK) else f"{option} {path}: not readable (permission denied)"


def _progress(total: int | None, enabled: bool, description: str | None = None):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc=description, disable=not enabled, file=sys.stderr)


def _server_address(args: argparse.Namespace) -> ServerAddress:
    return ServerAddress(
        ",".join(args.url) if args.url else DEFAULT_URLS[args.protocol], args.protocol, args.model, args.timeout,
        tls=getattr(args, "tls", False), tls_ca=getattr(args, "tls_ca", None), token=getattr(args, "token", None),
    )


def _served_config(address: ServerAddress):
    """The model's configuration, or one message saying why the server cannot be used (then None)."""
    try:
        with address.connect() as probe:
            return probe.served_config()
    except ServingError as error:
        print(_server_problem(address, error), file=sys.stderr)
        return None


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


class DuplicateId(Exception):
    pass


def _lines_to_send(lines, answers: AnswersFile, name: str, progress, shard: shards.Shard | None = None):
    """The input lines (of the shard) not answered yet; stops at an id already seen in this input."""
    seen: dict[str, int] = {}
    for line in lines:
        key = id_key(line.identifier)
        if key in seen:
            raise DuplicateId(f"{name} line {line.number}.id: {key} is the id of line {seen[key]} too; ids must be unique")
        seen[key] = line.number
        if shard is not None and not shard.holds(key):
            continue
        if key in answers.answered:
            progress.update(1)
        else:
            yield line, line.document


def classify_command(args: argparse.Namespace) -> int:
    if args.resume and args.output == "-":
        print("--resume continues an output file: give --output FILE", file=sys.stderr)
        return EXIT_BAD_INPUT
    address = _server_address(args)
    served = _served_config(address)
    if served is None:
        return EXIT_UNREACHABLE
    if args.top_k is not None and served.num_labels is not None and not 1 <= args.top_k <= served.num_labels:
        print(f"--top-k {args.top_k}: must be between 1 and {served.num_labels} (the number of classes of model "
              f"{args.model!r})", file=sys.stderr)
        return EXIT_BAD_INPUT
    name = "stdin" if args.input == "-" else Path(args.input).name
    total = None if args.shard else _count_lines(args.input)  # a shard's size is known only once read
    answers = AnswersFile(None if args.output == "-" else Path(args.output), resume=args.resume)
    if args.shard and (refusal := shards.foreign_answers(answers.answered, args.shard, args.output)):
        answers.close()
        print(refusal, file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.resume:
        redo = f"; {answers.dropped} line{'s' * (answers.dropped != 1)} of the earlier run to redo (errors, a line cut short)"
        print(f"resuming {args.output}: {len(answers.answered)} documents answered already{redo if answers.dropped else ''}",
              file=sys.stderr)
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    failures = written = 0
    progress = _progress(total, enabled=args.input != "-" and not args.quiet)
    try:
        with source, progress:
            pending = _lines_to_send(read_patent_lines(source, name), answers, name, progress, args.shard)
            for batch in classify_in_batches(pending, address, args.top_k, args.batch_size, args.concurrency):
                stop = next((answer for _, answer in batch if isinstance(answer, _SERVER_ERRORS)), None)
                if stop is not None:
                    print(f"stopped: {stop.message}\n{written} answers written to {args.output}; "
                          "once the server answers, run the same command with --resume to continue", file=sys.stderr)
                    return EXIT_UNREACHABLE
                lines = []
                for line, answer in batch:
                    if isinstance(answer, ServingError):
                        failures += 1
                        lines.append({"id": line.identifier, **_error_json(at_line(answer, line, name))})
                    else:
                        lines.append({"id": line.identifier, **answer.to_json()})
                answers.write(lines)
                written += len(lines)
                progress.update(len(lines))
    except DuplicateId as error:
        print(f"{error}\n{written} answers written to {args.output}; fix the input, then run with --resume", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        answers.close()
    if failures:
        print(f"{failures} of {written} documents failed; see their \"error\" lines", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else 0


def evaluate_command(args: argparse.Namespace) -> int:
    from patent_classifier_client import evaluation

    try:
        samples = evaluation.read_labelled_patents(args.input)
    except (InvalidInput, OSError) as error:
        print(f"cannot evaluate: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.start_server is None:
        address = _server_address(args)
        served = _classify_labelled(args, samples, address)
    else:
        address, served = _classify_on_own_server(args, samples)
    if isinstance(served, int):
        return served
    answers, seconds, class_names = served
    try:
        scored = evaluation.score_answers(
            samples, answers, args.top_k, input_name=str(args.input), model=address.model,
            server=f"{address.protocol} {address.url}", seconds=seconds, class_names=class_names,
        )
        offline_top1 = None
        if args.model_dir is not None:  # the one way this command loads a model itself
            comparison, offline_top1 = evaluation.compare_with_offline(
                args.model_dir, samples, answers, args.max_length, args.offline_device, progress=not args.quiet
            )
            scored.report.offline = comparison
        written = evaluation.write_report(args.out, scored, samples, answers, offline_top1)
    except ServingError as error:
        print(f"cannot evaluate: {error}", file=sys.stderr)
        return EXIT_SOME_FAILED
    _print_summary(scored.report, written)
    if args.min_accuracy is not None and scored.report.accuracy < args.min_accuracy:
        print(f"FAILED: accuracy {scored.report.accuracy:.4f} is below --min-accuracy {args.min_accuracy:.4f}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_SOME_FAILED if scored.report.unanswered else 0


def _classify_on_own_server(args: argparse.Namespace, samples) -> tuple[ServerAddress, tuple | int]:
    """`make eval` from a fresh clone: no server is running, so start one on free loopback ports.

    It is stopped as soon as the documents are answered, before the offline model loads: a 9B
    model on one GPU has no room for a second copy."""
    launcher = server_module("server.launcher", "--start-server")
    LaunchConfig, ServerNotReady, TritonServer = launcher.LaunchConfig, launcher.ServerNotReady, launcher.TritonServer
    free_loopback_ports = launcher.free_loopback_ports

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
        return address, EXIT_UNREACHABLE
    try:
        print(f"tritonserver ready in {server.startup_seconds:.1f} s at {url}", file=sys.stderr)
        return address, _classify_labelled(args, samples, address)
    finally:
        server.stop()


def _classify_labelled(args: argparse.Namespace, samples, address: ServerAddress) -> tuple[list, float, dict] | int:
    """Every document's answer (or typed error) in input order, the seconds it took and the model's
    classes (code → name); or the exit code when the server cannot be used or the labels are not its classes."""
    from patent_classifier_client.evaluation import unknown_labels

    try:
        with address.connect() as probe:
            class_names = probe.model_labels()
    except ServingError as error:
        print(f"cannot evaluate: {_server_problem(address, error, doing='with')}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if class_names is None:
        print(f"cannot evaluate: model {address.model!r} does not say which classes it has (no num_labels in its "
              "config.pbtxt: it was exported by an older version); export it again", file=sys.stderr)
        return EXIT_BAD_INPUT
    unknown = unknown_labels(samples, class_names)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        print(f"cannot evaluate: {len(unknown)} labels of {args.input} are not classes of model {address.model!r}: {shown}. "
              f"Its {len(class_names)} classes are {', '.join(sorted(class_names)[:3])}, …: is the file for another model?",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    started = time.perf_counter()
    answers = []
    with _progress(len(samples), enabled=not args.quiet, description="served") as progress:
        for batch in classify_in_batches(
            enumerate(sample.document for sample in samples), address, args.top_k, args.batch_size, args.concurrency
        ):
            answers.extend(answer for _, answer in batch)
            progress.update(len(batch))
    return answers, time.perf_counter() - started, class_names


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
            f"offline transformers in {offline.reference_dtype}: top-1 agreement {offline.top1_agreement:.4f}, "
            f"accuracy {offline.offline_accuracy:.4f}, "
            f"max |Δprobability| {offline.max_probability_difference:.2e}"
        )
    if report.confused_pairs:
        lines.append("most confused      " + ", ".join(
            f"{pair['true']} → {pair['predicted']} ×{pair['documents']}" for pair in report.confused_pairs[:3]
        ) + "   (all with names: confused_pairs.txt)")
    if report.unanswered:
        lines.append(f"{len(report.unanswered)} patents were not answered; see report.json \"unanswered\"")
    lines.append("wrote " + ", ".join(str(path) for path in written))
    print("\n".join(lines))


def web_command(args: argparse.Namespace) -> int:
    """Run the Streamlit page; it calls the server through this client library."""
    classifier = _server_address(args)
    env = dict(os.environ)
    # Streamlit puts only the script's own folder on sys.path; the page imports this package.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_FOLDER), env.get("PYTHONPATH")]))
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


def feedback_submit_command(args: argparse.Namespace) -> int:
    from patent_classifier_client.corrections import Correction, read_corrections, submit_in_batches

    address = _server_address(args)
    try:  # as classify does: a server that cannot take corrections is one message, not an error per line
        with address.connect() as probe:
            probe.check_takes_corrections()
    except ServingError as error:
        print(f"cannot submit corrections to {address.url} ({address.protocol}): {error.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with source:
        numbered = read_corrections(source.readlines(), "standard input" if args.input == "-" else Path(args.input).name)
    output = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    failures = written = 0
    outcomes = (outcome for batch in submit_in_batches([c for _, c in numbered], address, args.batch_size,
                                                        args.concurrency) for outcome in batch)
    with output:
        for (number, correction), outcome in zip(numbered, outcomes):
            if isinstance(outcome, _SERVER_ERRORS):
                print(f"stopped: {outcome.message}\n{written} verdicts written to {args.output}; the corrections from "
                      f"line {number} on were not sent", file=sys.stderr)
                return EXIT_UNREACHABLE
            line = {"line": number, **({"prediction_id": correction.prediction_id} if isinstance(correction, Correction) else {})}
            if isinstance(outcome, ServingError):
                failures += 1
                line.update(_error_json(outcome))
            else:
                line["verdict"] = outcome
            output.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
    if failures:
        print(f"{failures} of {len(numbered)} corrections were not recorded; see their \"error\" lines", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else 0


def feedback_export_command(args: argparse.Namespace) -> int:
    from patent_classifier_client.corrections import export_corrected_examples

    try:
        counts = export_corrected_examples(args.database, args.out, args.model)
    except InvalidInput as error:
        print(f"cannot export: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:  # not a database URL
        print(f"cannot export: --database {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServingError as error:
        print(f"cannot export: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"{counts.written} corrected examples written to {args.out}"
          + (f"; {counts.without_text} more were recorded without their text (prediction_records: hash)"
             if counts.without_text else ""), file=sys.stderr)
    return 0


def _add_server_arguments(parser: argparse.ArgumentParser, timeout_s: float, model: bool = True) -> None:
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="KServe v2 over gRPC or HTTP: the port must match")
    parser.add_argument(
        "--url", action="append", default=None,
        help=f"host:port (default {DEFAULT_URLS['grpc']} for gRPC, {DEFAULT_URLS['http']} for HTTP); several replicas: "
        "a:8001,b:8001 or --url repeated, or dns:///name:port for every address of a name",
    )
    if model:
        parser.add_argument("--model", default=DEFAULT_MODEL, help="the model's name on the server")
    else:  # the server's feedback model takes every model's corrections
        parser.set_defaults(model=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=timeout_s, help="seconds per request")


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="connect with TLS, verifying the server against the system's CAs")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA certificate to verify the server with (implies --tls)")
    parser.add_argument(
        "--token-file", type=Path, default=None,
        help=f"file holding the server's access token (default: ${access_token.TOKEN_ENV} when set)",
    )


def _add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="documents per request (never more than the model's limit)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog=_program_name(), description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify patents from a JSON-lines file", formatter_class=HelpFormatter)
    classify.add_argument("--input", default="-", help="JSON-lines file, or - for standard input")
    classify.add_argument("--output", default="-", help="JSON-lines file, or - for standard output")
    classify.add_argument(
        "--resume", action="store_true",
        help="continue --output from an interrupted run: skip the ids it answered, redo its error lines",
    )
    _add_server_arguments(classify, timeout_s=120.0)
    _add_security_arguments(classify)
    classify.add_argument("--top-k", type=int, default=None, help="classes per document (server default: 5)")
    classify.add_argument("--shard", type=shards.Shard.parse, default=None, metavar="I/N",
                          help="answer only shard I (from 0) of N of the input, by each line's id (clients/patent_classifier_client/shards.py)")
    _add_batching_arguments(classify)
    classify.set_defaults(run=classify_command)
    shards.add_commands(commands, HelpFormatter)

    evaluate = commands.add_parser("evaluate", help="accuracy report of the served model on a labelled JSON-lines file", formatter_class=HelpFormatter)
    evaluate.add_argument("--input", type=Path, required=True, help='JSON-lines file: patents with their true class code in "label"')
    evaluate.add_argument("--out", type=Path, required=True, help="folder for report.json, classification_report.txt, confusion_matrix.png, predictions.jsonl")
    _add_server_arguments(evaluate, timeout_s=120.0)
    _add_security_arguments(evaluate)
    evaluate.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy")
    evaluate.add_argument(
        "--min-accuracy", type=float, default=None,
        help="a release gate: exit 1 when the served model's accuracy is below this (0 to 1)",
    )
    _add_batching_arguments(evaluate)
    evaluate.add_argument(
        "--start-server", type=Path, default=None, metavar="MODEL_REPOSITORY",
        help="start tritonserver on this model repository on free loopback ports for the evaluation, then stop it",
    )
    evaluate.add_argument(
        "--model-dir", type=Path, default=None,
        help="merged model folder (e.g. model_repository/kscst-gemma2/1/model): also run it offline in transformers, in "
        "float32 whatever the server computes in, and report the agreement (without it no model is loaded here)",
    )
    evaluate.add_argument("--max-length", type=int, default=512, help="tokens per document offline; must be the server's max_length")
    evaluate.add_argument("--offline-device", choices=["auto", "cpu", "cuda"], default="auto", help="with --model-dir: where the offline model runs")
    evaluate.set_defaults(run=evaluate_command)

    web = commands.add_parser("web", help="the web page to try a patent (Streamlit), calling a running server", formatter_class=HelpFormatter)
    _add_server_arguments(web, timeout_s=60.0)
    _add_security_arguments(web)
    web.add_argument("--address", default="127.0.0.1", help="address the page binds to")
    web.add_argument("--port", type=int, default=8501, help="port the page listens on")
    web.set_defaults(run=web_command)

    feedback = commands.add_parser(
        "feedback", help="examiners' corrections: submit a file of them, or export the corrected examples", formatter_class=HelpFormatter
    )
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    submit = feedback_commands.add_parser(
        "submit", help="submit corrections from a JSON-lines file to the server's feedback model", formatter_class=HelpFormatter
    )
    submit.add_argument("--input", default="-", help='JSON-lines file of {"prediction_id", "label", "examiner_id"?, "comment"?}, or -')
    submit.add_argument("--output", default="-", help="JSON-lines file of verdicts, or - for standard output")
    _add_server_arguments(submit, timeout_s=60.0, model=False)
    _add_security_arguments(submit)
    submit.add_argument("--batch-size", type=int, default=32, help="corrections per request")
    submit.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    submit.set_defaults(run=feedback_submit_command)
    export = feedback_commands.add_parser(
        "export", help="write the corrected examples whose text was recorded, as training data", formatter_class=HelpFormatter
    )
    export.add_argument("--database", required=True,
                        help="the records database (serving field records_database): sqlite:///PATH or postgresql://USER@HOST/DB")
    export.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    export.add_argument("--model", default=None, help="only this model's corrections (default: every model's)")
    export.set_defaults(run=feedback_export_command)

    args = parser.parse_args(argv)
    if getattr(args, "url", None):  # every command but feedback export, which reads the database
        try:
            args.url, scheme_asks_tls = without_scheme(args.url, args.protocol)
            parse_targets(args.url, args.protocol)
        except ValueError as exc:
            parser.error(f"--{exc}")
        args.tls = args.tls or scheme_asks_tls
    for option, path, writing in _files_named(args):
        problem = _file_problem(path, option, writing)
        if problem:
            parser.error(problem)
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
        if args.min_accuracy is not None and not 0 <= args.min_accuracy <= 1:
            parser.error(f"--min-accuracy {args.min_accuracy}: must be between 0 and 1")
        if args.start_server is not None and args.url is not None:
            parser.error("give --url (a running server) or --start-server (start one), not both")
    try:
        return args.run(args)
    except ServingError as error:  # what no command expected; still the user's one line, not a traceback
        print(f"{parser.prog}: {error.kind.value}: {error.message}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(error, InvalidInput) else EXIT_UNREACHABLE


def _files_named(args: argparse.Namespace) -> list[tuple[str, str | Path, bool]]:
    """(option, path, written?) for each file the command reads or writes, checked before anything is sent."""
    command = (args.command, getattr(args, "feedback_command", None))
    if command in (("classify", None), ("feedback", "submit")):
        return [("--input", args.input, False), ("--output", args.output, True)]
    if command == ("evaluate", None):
        return [("--input", args.input, False)]
    if command == ("feedback", "export"):
        return [("--out", args.out, True)]
    return []


if __name__ == "__main__":
    sys.exit(main())
