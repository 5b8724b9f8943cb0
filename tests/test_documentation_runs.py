"""Every shell and Python block of README.md and docs/ run as a reader runs them, against a real
server: the docs work as written, or this fails naming the block.

The reader's setting, made real rather than imitated:
- A checkout after `make setup`: the repository's files, the project's `.venv`, and a
  `model_repository/` holding the demo Gemma-2 (which records its predictions into
  `build/prediction-records.db`, as models.yaml's does) and the feedback model.
- `make serve` running: `python -m server` on the documented ports 8000, 8001 and 8002. It runs in
  a network namespace of its own (`unshare --net`), and the blocks in the same namespace
  (`nsenter --net`), so `127.0.0.1:8001` in a page means this server and no other test's.
- A fresh terminal per page: the project's `.venv/bin` is not on PATH, so a page must say
  `source .venv/bin/activate` (or write `.venv/bin/…`) where a reader needs it. A page's blocks
  run in order in one shell, as a reader goes down the page; the first command that fails stops it.
- Python blocks run as scripts with the project's Python (`python block.py` in the checkout).
- Files a page assumes the reader has of their own: READER_FILES, and `corrections.jsonl`, an
  examiner's corrections of answers this server gave (docs/feedback.md).

`make` in a block is GNU make told that the environment is set up (`-o .venv/.installed`): this suite
runs inside that environment and never installs it again. A block that cannot run here says so
and names the check that exercises it instead; tests/test_documentation.py checks those markers.
Imports in the pages are taken as written: the blocks run with the environment's own packages.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MODEL_NAME, PROJECT_ROOT, shell_environment
from tests.test_documentation import PYTHON_LANGUAGES, console_commands, run_documents, runnable_blocks

pytestmark = pytest.mark.server  # the pages' commands against a real tritonserver

# The reader's own patents and labelled file, as the pages name them: the shipped examples.
READER_FILES = {
    "patents.jsonl": PROJECT_ROOT / "clients" / "examples" / "patents.jsonl",
    "validation.jsonl": PROJECT_ROOT / "clients" / "examples" / "labelled_patents.jsonl",
}
SERVER_READY_TIMEOUT_S = 300
# A page's blocks together: `make eval` sends 120 patents several times, one block loads the model offline.
PAGE_TIMEOUT_S = 1200
BLOCK_MARK = "::doc-block "
ALL_RAN = "::doc-every-block-ran"


def pages_with_blocks_to_run() -> list[Path]:
    return [page for page in run_documents() if any(marker is None for _, marker in runnable_blocks(page))]


@pytest.fixture(scope="module")
def reader_checkout(exported, tmp_path_factory) -> Path:
    from core.serving_config import FeedbackConfig
    from export.triton_package import MODEL_VERSION, write_feedback_model, write_triton_model

    checkout = tmp_path_factory.mktemp("reader") / "checkout"
    checkout.mkdir()
    for entry in PROJECT_ROOT.iterdir():
        if entry.name not in {"build", "model_repository", ".git"}:
            (checkout / entry.name).symlink_to(entry)
    (checkout / "build").mkdir()
    records = f"sqlite:///{checkout / 'build' / 'prediction-records.db'}"
    repository = checkout / "model_repository"
    serving = exported.models.model(MODEL_NAME).serving.model_copy(update={"records_database": records})
    version = repository / MODEL_NAME / MODEL_VERSION
    version.mkdir(parents=True)
    (version / serving.model_dir).symlink_to(exported.merged_dir.resolve(), target_is_directory=True)  # what the export wrote
    write_triton_model(repository, MODEL_NAME, serving)
    write_feedback_model(repository, FeedbackConfig(records_database=records))
    for name, source in READER_FILES.items():
        shutil.copyfile(source, checkout / name)
    return checkout


def in_namespace(pid: int) -> list[str]:
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--"]


@pytest.fixture(scope="module")
def served_namespace(reader_checkout, tmp_path_factory):
    """`python -m server` on the default ports in a network namespace of its own; yields its pid."""
    log_path = tmp_path_factory.mktemp("reader-server") / "server.log"
    environment = {**os.environ, "PATENT_CLASSIFIER_RECORDS_DATABASE": f"sqlite:///{reader_checkout / 'build' / 'prediction-records.db'}"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
             sys.executable, "-m", "server", "--model-repository", "model_repository"],
            cwd=reader_checkout, stdout=log, stderr=subprocess.STDOUT, env=environment,
        )
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        ready = [*in_namespace(process.pid), "curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:8000/v2/health/ready"]
        while subprocess.run(ready, capture_output=True, timeout=30).returncode != 0:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server was not ready in {SERVER_READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        write_corrections(process.pid, reader_checkout)
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)  # it drains and stops tritonserver, as Ctrl-C on `make serve` does
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_corrections(pid: int, checkout: Path) -> None:
    """corrections.jsonl as an examiner writes it: a class for each of a few answers of this server."""
    classified = subprocess.run(
        [*in_namespace(pid), sys.executable, "-m", "patent_classifier_client", "classify", "--input", "patents.jsonl", "--quiet"],
        cwd=checkout, capture_output=True, text=True, timeout=300, check=True,
    )
    answers = [json.loads(line) for line in classified.stdout.splitlines()][:3]
    (checkout / "corrections.jsonl").write_text("".join(
        json.dumps({"prediction_id": answer["prediction_id"], "label": answer["labels"][1]["code"], "examiner_id": "e-42"}) + "\n"
        for answer in answers
    ), encoding="utf-8")


def reader_environment() -> dict[str, str]:
    """This process's environment as a fresh terminal has it: no virtual environment active."""
    venv_bins = {str(Path(sys.executable).parent), str(PROJECT_ROOT / ".venv" / "bin")}
    environment = {name: value for name, value in shell_environment().items() if name not in {"VIRTUAL_ENV", "PYTHONHOME"}}
    environment["PATH"] = os.pathsep.join(part for part in environment.get("PATH", "").split(os.pathsep) if part not in venv_bins)
    return environment


def page_session(page: Path, checkout: Path, folder: Path) -> Path:
    """One bash script that runs the page's blocks in order, marking where each begins."""
    lines = [
        "exec 2>&1",
        f"cd {checkout}",
        "make() { command make -o .venv/.installed -o .venv/.project-installed \"$@\"; }",
        "set -eo pipefail",
    ]
    for number, (block, marker) in enumerate(runnable_blocks(page)):
        if marker is not None:
            continue
        lines.append(f"printf '\\n{BLOCK_MARK}%s\\n' '{block.where()}'")
        if block.language in PYTHON_LANGUAGES:
            script = folder / f"block-{number}.py"
            script.write_text(block.text + "\n", encoding="utf-8")
            lines.append(f"{checkout}/.venv/bin/python {script}")
        else:
            script = folder / f"block-{number}.sh"
            script.write_text((console_commands(block.text) if block.language == "console" else block.text) + "\n", encoding="utf-8")
            lines.append(f"source {script}")
    lines.append(f"printf '\\n{ALL_RAN}\\n'")
    session = folder / "page.sh"
    session.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return session


@pytest.mark.parametrize("page", pages_with_blocks_to_run(), ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_the_pages_blocks_run_as_written(page, reader_checkout, served_namespace, tmp_path):
    session = page_session(page, reader_checkout, tmp_path)
    try:
        ran = subprocess.run([*in_namespace(served_namespace), "bash", str(session)], cwd=reader_checkout,
                             env=reader_environment(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=PAGE_TIMEOUT_S)
        output, code = ran.stdout, ran.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = (expired.stdout or b"").decode(errors="replace"), f"killed after {PAGE_TIMEOUT_S} s"
    if ALL_RAN in output and code == 0:
        return
    last = output.rsplit(BLOCK_MARK, 1)
    where, _, block_output = last[1].partition("\n") if len(last) == 2 else ("before the first block", "", output)
    pytest.fail(f"{where}: the block failed (exit {code}) as a reader runs it; its output:\n{block_output[-4000:]}")
