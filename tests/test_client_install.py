"""The client as an office installs it. `pip install ./clients` into a clean environment gives one
import package, `patent_classifier_client`, and the `patent-classify` command, without torch and
without a generic top-level name (`core`, `clients`, `server`, `export`) that would shadow or be
shadowed by a package of the office's own backend; it classifies through a real server from there.
`make setup` installs both distributions into .venv (editable, without touching the pinned set),
so the command and the imports work from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.launcher import free_loopback_ports
from tests.conftest import EXAMPLE_PATENTS, PROJECT_ROOT

pytestmark = pytest.mark.tools  # pip into fresh virtual environments

CLIENT = PROJECT_ROOT / "clients"  # the client distribution's folder
PACKAGE = "patent_classifier_client"
GENERIC_NAMES = ("core", "clients", "server", "export")  # the layout's folders, which nothing installs for a client
INSTALL_TIMEOUT_S = 600


def outside_the_checkout() -> dict:
    """The environment of a user's shell: the checkout reachable only through what is installed."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def project_name(checkout: Path) -> str:
    return tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["name"]


def test_make_setup_installs_the_project_so_the_command_and_import_work_from_any_directory(tmp_path):
    command = Path(sys.executable).parent / "patent-classify"
    assert command.exists(), "not installed: `make setup` runs pip install --no-deps --editable ./clients ."
    shown = subprocess.run([str(command), "--help"], cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "classify" in shown.stdout and "evaluate" in shown.stdout, shown.stderr
    found = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}, core, server; print({PACKAGE}.__file__); print(server.__file__)"],
        cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60,
    )
    assert found.returncode == 0, found.stderr
    client_file, server_file = map(Path, found.stdout.split())
    client_checkout, server_checkout = client_file.parent.parent.parent, server_file.parent.parent
    # A checkout of this project (the shared venv's may be another's), and one checkout for both.
    assert client_checkout == server_checkout and project_name(server_checkout) == project_name(PROJECT_ROOT)


@pytest.mark.server
def test_pip_install_of_the_client_gives_one_namespaced_package_and_classifies_through_a_real_server(tmp_path, server):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # From the package registry, with the dependencies clients/pyproject.toml declares.
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    python = str(venv / "bin" / "python")
    listed = subprocess.run(
        [python, "-c", "import importlib.metadata as m, sysconfig, os\n"
         "print(sorted(os.listdir(sysconfig.get_paths()['purelib'])))\n"
         "files = m.distribution('patent-classifier-client').files\n"
         "print(sorted({f.parts[0] for f in files if not f.parts[0].endswith('.dist-info') and f.parts[0] != '..'}))"],
        cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    site_packages, own_top_level = (eval(line) for line in listed.stdout.splitlines())  # noqa: S307 (our own printout)
    assert own_top_level == [PACKAGE]
    assert not set(GENERIC_NAMES) & set(site_packages), site_packages
    assert not {"torch", "transformers"} & set(site_packages)

    probe = subprocess.run(
        [python, "-c", f"from {PACKAGE} import PatentClassifier, AsyncPatentClassifier, PatentDocument, InvalidInput\n"
         f"import {PACKAGE}.batch_classification, {PACKAGE}.answers_file, {PACKAGE}.patent_lines, {PACKAGE}.shards\n"
         f"import {PACKAGE}, pathlib; print(pathlib.Path({PACKAGE}.__file__).parent.joinpath('py.typed').exists())"],
        cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "True", probe.stderr

    command = str(venv / "bin" / "patent-classify")
    shown = subprocess.run([command, "--help"], cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "classify" in shown.stdout and "patent-classify" in shown.stdout, shown.stderr

    (nobody,) = free_loopback_ports(1)
    refused = subprocess.run([command, "classify", "--input", str(EXAMPLE_PATENTS), "--url", f"127.0.0.1:{nobody}"],
                             cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and f"nothing listens at 127.0.0.1:{nobody}" in refused.stderr

    answered = subprocess.run([command, "classify", "--input", str(EXAMPLE_PATENTS), "--url", server.grpc_url, "--quiet"],
                              cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=300)
    assert answered.returncode == 0, answered.stderr
    lines = answered.stdout.splitlines()
    assert len(lines) == len(EXAMPLE_PATENTS.read_text(encoding="utf-8").splitlines())
    assert all('"labels"' in line and '"prediction_id"' in line for line in lines), lines[:2]

    # What needs the server's side says so in one line, with no traceback.
    database = tmp_path / "records.db"
    database.touch()
    borrowed = subprocess.run([command, "feedback", "export", "--database", f"sqlite:///{database}", "--out", str(tmp_path / "o.jsonl")],
                              cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert borrowed.returncode == 2 and "needs the server side of this project" in borrowed.stderr, borrowed.stderr
    assert "Traceback" not in borrowed.stderr
