"""Every mistake a user can make with `patent-classify` (`python -m patent_classifier_client`) is one line on standard
error and the exit code docs/clients.md gives it: no traceback, no line per document or
correction, no file created. One table of cases, each with its exit code and the words its one
line must hold; the cases that need no server run in the fast tier, the others against the real
tritonserver, through a new process as a user runs the command."""
from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from patent_classifier_client.__main__ import EXIT_BAD_INPUT, EXIT_SOME_FAILED, EXIT_UNREACHABLE, main
from tests.conftest import EXAMPLE_PATENTS, KOELECTRA_MODEL, MODEL_NAME, PROJECT_ROOT

CLIENTS_DOC = PROJECT_ROOT / "docs" / "clients.md"


@dataclass(frozen=True)
class CliError:
    name: str
    argv: tuple[str, ...]  # {placeholders} filled in by ``filled``
    exit_code: int
    line: str  # a regular expression the one line of standard error must match (re.search)
    server: bool = False  # needs the real tritonserver

    def __str__(self) -> str:
        return self.name


PATENTS = str(EXAMPLE_PATENTS)
CLI_ERRORS = [
    CliError("input file missing", ("classify", "--input", "{tmp}/patents.jsonl"), EXIT_BAD_INPUT,
             r"^python -m patent_classifier_client: --input \S+/patents\.jsonl: no such file$"),
    CliError("input is a folder", ("classify", "--input", "{tmp}"), EXIT_BAD_INPUT, r"--input \S+: is a folder, not a file$"),
    CliError("output in a missing folder", ("classify", "--input", PATENTS, "--output", "/nonexistent/dir/o.jsonl"),
             EXIT_BAD_INPUT, r"--output /nonexistent/dir/o\.jsonl: the folder /nonexistent/dir does not exist$"),
    CliError("corrections file missing", ("feedback", "submit", "--input", "{tmp}/verdicts.jsonl"), EXIT_BAD_INPUT,
             r"--input \S+/verdicts\.jsonl: no such file$"),
    CliError("labelled file missing", ("evaluate", "--input", "{tmp}/validation.jsonl", "--out", "{tmp}/eval"), EXIT_BAD_INPUT,
             r"--input \S+/validation\.jsonl: no such file$"),
    CliError("an HTTP URL for gRPC", ("classify", "--input", PATENTS, "--url", "http://127.0.0.1:8000"), EXIT_BAD_INPUT,
             r"--url: 'http://127\.0\.0\.1:8000' is an HTTP address, but the protocol is grpc: use protocol http "
             r"\(--protocol http\), or give the grpc port as host:port$"),
    CliError("an address without a port", ("classify", "--input", PATENTS, "--url", "localhost"), EXIT_BAD_INPUT,
             r"--url: 'localhost' is not host:port"),
    CliError("an unknown option", ("classify", "--input", PATENTS, "--format", "csv"), EXIT_BAD_INPUT,
             r"^python -m patent_classifier_client: unrecognized arguments: --format csv$"),
    CliError("records database missing", ("feedback", "export", "--database", "sqlite:///{tmp}/records.db", "--out", "{tmp}/o.jsonl"),
             EXIT_BAD_INPUT, r"^cannot export: --database sqlite:///\S+/records\.db: no such database file \(this command reads "
             r"the records database the server writes and never creates one\)$"),
    CliError("not a records database", ("feedback", "export", "--database", "sqlite:///{tmp}/other.db", "--out", "{tmp}/o.jsonl"),
             EXIT_BAD_INPUT, r"--database sqlite:///\S+/other\.db: is not a records database \(no such table: predictions\)$"),
    CliError("not a database URL", ("feedback", "export", "--database", "{tmp}/records.db", "--out", "{tmp}/o.jsonl"),
             EXIT_BAD_INPUT, r"^cannot export: --database is '\S+'; it must be sqlite:///PATH"),
    CliError("export into a missing folder", ("feedback", "export", "--database", "sqlite:///{tmp}/other.db", "--out",
                                              "/nonexistent/dir/o.jsonl"), EXIT_BAD_INPUT, r"--out /nonexistent/dir/o\.jsonl: the folder"),
    # Against the real server.
    CliError("nothing listens (classify)", ("classify", "--input", PATENTS, "--url", "{nobody}"), EXIT_UNREACHABLE,
             r"^cannot reach model 'kscst-gemma2' at \S+ \(grpc\): nothing listens at \S+: is the server running", server=True),
    CliError("nothing listens (feedback submit)", ("feedback", "submit", "--input", "{corrections}", "--url", "{nobody}"),
             EXIT_UNREACHABLE, r"^cannot submit corrections to \S+ \(grpc\): nothing listens at \S+: is the server running",
             server=True),
    CliError("nothing listens (evaluate)", ("evaluate", "--input", "{labelled}", "--out", "{tmp}/eval", "--url", "{nobody}"),
             EXIT_UNREACHABLE, r"^cannot evaluate: with model 'kscst-gemma2' at \S+ \(grpc\): nothing listens at", server=True),
    CliError("the HTTP port over gRPC", ("classify", "--input", PATENTS, "--url", "{http}"), EXIT_UNREACHABLE,
             r"answers, but not over grpc: it looks like the server's http port; use protocol http", server=True),
    CliError("the metrics port", ("classify", "--input", PATENTS, "--url", "{metrics}", "--protocol", "http"), EXIT_UNREACHABLE,
             r"answers over HTTP, but not as a KServe v2 server \(its answer is not JSON\): is it the server's metrics port\?",
             server=True),
    CliError("an unknown model", ("classify", "--input", PATENTS, "--url", "{grpc}", "--model", "kscst-gemma"), EXIT_UNREACHABLE,
             rf"^\S+ serves no model 'kscst-gemma'; the classifiers it serves: (\S+, )*{MODEL_NAME}(, \S+)*$", server=True),
    CliError("a model that is no classifier", ("classify", "--input", PATENTS, "--url", "{grpc}", "--model", "feedback"),
             EXIT_UNREACHABLE, r"^model 'feedback' at \S+ is not a patent classifier \(it takes examiners' corrections\); "
             rf"the classifiers it serves: .*{MODEL_NAME}", server=True),
    CliError("--top-k 0", ("classify", "--input", PATENTS, "--url", "{grpc}", "--top-k", "0"), EXIT_BAD_INPUT,
             rf"^--top-k 0: must be between 1 and 188 \(the number of classes of model '{MODEL_NAME}'\)$", server=True),
]


def filled(case: CliError, places: dict[str, str]) -> list[str]:
    return [part.format(**places) for part in case.argv]


def user_files(tmp_path: Path) -> dict[str, str]:
    """The placeholders every case may use: a scratch folder holding a file that is no records database."""
    with sqlite3.connect(tmp_path / "other.db") as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    corrections = tmp_path / "corrections.jsonl"
    corrections.write_text('{"prediction_id": "0", "label": "KSCST-001"}\n', encoding="utf-8")
    return {"tmp": str(tmp_path), "corrections": str(corrections),
            "labelled": str(PROJECT_ROOT / "clients" / "examples" / "labelled_patents.jsonl")}


def assert_one_line(case: CliError, code: int, stdout: str, stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert (code, len(lines)) == (case.exit_code, 1), f"{case.name}: exit {code}, standard error:\n{stderr}"
    assert re.search(case.line, lines[0]), f"{case.name}: {lines[0]!r} does not match {case.line!r}"
    assert "Traceback" not in stderr and stdout == ""


@pytest.mark.parametrize("case", [case for case in CLI_ERRORS if not case.server], ids=str)
def test_each_user_error_without_a_server_is_one_line_and_its_exit_code(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    try:
        code = main(filled(case, user_files(tmp_path)))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert_one_line(case, code, captured.out, captured.err)
    assert sorted(tmp_path.rglob("*")) == sorted(set(before) | {tmp_path / "other.db", tmp_path / "corrections.jsonl"})


@pytest.mark.server
@pytest.mark.parametrize("case", [case for case in CLI_ERRORS if case.server], ids=str)
def test_each_user_error_against_a_server_is_one_line_and_its_exit_code(case, server, tmp_path):
    from server.launcher import free_loopback_ports

    (nobody,) = free_loopback_ports(1)
    places = {**user_files(tmp_path), "grpc": server.grpc_url, "http": server.http_url, "nobody": f"127.0.0.1:{nobody}",
              "metrics": server.metrics_url.removeprefix("http://").removesuffix("/metrics")}
    result = subprocess.run([sys.executable, "-m", "patent_classifier_client", *filled(case, places)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert_one_line(case, result.returncode, result.stdout, result.stderr)


@pytest.mark.server
def test_an_address_with_its_scheme_is_taken_by_the_command(server, tmp_path):
    """`--url http://127.0.0.1:8000 --protocol http` was tritonclient's "url should not include the scheme"
    and an AttributeError from its __del__."""
    result = subprocess.run(  # a model that records nothing: the records tests count what is recorded
        [sys.executable, "-m", "patent_classifier_client", "classify", "--input", PATENTS, "--url", f"http://{server.http_url}/",
         "--protocol", "http", "--model", KOELECTRA_MODEL, "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert len(result.stdout.splitlines()) == len(EXAMPLE_PATENTS.read_text(encoding="utf-8").splitlines())


def test_the_records_database_is_never_created_by_the_export(tmp_path):
    missing = tmp_path / "build" / "records.db"
    assert main(["feedback", "export", "--database", f"sqlite:///{missing}", "--out", str(tmp_path / "o.jsonl")]) == EXIT_BAD_INPUT
    assert not missing.parent.exists() and not (tmp_path / "o.jsonl").exists()


def test_the_help_names_the_command_the_user_ran():
    installed = Path(sys.executable).with_name("patent-classify")
    shown = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: patent-classify [-h]")
    as_module = subprocess.run([sys.executable, "-m", "patent_classifier_client", "classify", "--help"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert as_module.stdout.startswith("usage: python -m patent_classifier_client classify")


def test_the_exit_codes_are_the_ones_docs_clients_md_tables():
    rows = re.findall(r"^\| (\d) \| (.+?) \|", CLIENTS_DOC.read_text(encoding="utf-8").split("## Exit codes")[1], re.MULTILINE)
    assert [int(code) for code, _ in rows] == [0, EXIT_SOME_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE]
    assert {case.exit_code for case in CLI_ERRORS} == {EXIT_BAD_INPUT, EXIT_UNREACHABLE}
