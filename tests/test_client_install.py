"""The client as an office installs it: `make setup` puts the project into .venv (editable, without
touching the pinned set), so `patent-classify` and `import clients` work from any directory; and
`pip install .` into a clean environment gives the client library and command without torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.launcher import free_loopback_ports
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.tools  # pip into fresh virtual environments

PACKAGES = ("core", "clients", "server", "export")  # pyproject.toml's [tool.setuptools] packages
INSTALL_TIMEOUT_S = 600


def outside_the_checkout() -> dict:
    """The environment of a user's shell: the checkout reachable only through what is installed."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def project_name(checkout: Path) -> str:
    return tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["name"]


def test_make_setup_installs_the_project_so_the_command_and_import_work_from_any_directory(tmp_path):
    command = Path(sys.executable).parent / "patent-classify"
    assert command.exists(), "not installed: `make setup` runs pip install --no-deps --editable ."
    shown = subprocess.run([str(command), "--help"], cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "classify" in shown.stdout and "evaluate" in shown.stdout, shown.stderr
    found = subprocess.run(
        [sys.executable, "-c", "import clients, core; print(clients.__file__)"],
        cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60,
    )
    assert found.returncode == 0, found.stderr
    checkout = Path(found.stdout.strip()).parent.parent  # a checkout of this project (the shared venv's may be another's)
    assert project_name(checkout) == project_name(PROJECT_ROOT)


def test_pip_install_in_a_clean_environment_gives_the_client_without_torch(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # From the package registry, with the dependencies pyproject.toml declares for the client.
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    python = str(venv / "bin" / "python")
    probe = subprocess.run(
        [python, "-c", "import importlib.util, sys\n"
         "import clients, clients.__main__, clients.batch_classification, clients.answers_file, clients.patent_lines\n"
         "from clients import PatentClassifier, AsyncPatentClassifier, PatentDocument\n"
         "print(sorted(name for name in ('torch', 'transformers') if importlib.util.find_spec(name)))\n"
         "print(clients.__file__)"],
        cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    absent, location = probe.stdout.splitlines()
    assert absent == "[]"  # neither is installed, and the client imported without them
    assert Path(location).is_relative_to(venv)

    command = str(venv / "bin" / "patent-classify")
    shown = subprocess.run([command, "--help"], cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "classify" in shown.stdout, shown.stderr
    (nobody,) = free_loopback_ports(1)
    patents = tmp_path / "patents.jsonl"
    patents.write_text('{"id": 1, "title": "특허 문서 분류 장치"}\n', encoding="utf-8")
    refused = subprocess.run([command, "classify", "--input", str(patents), "--url", f"127.0.0.1:{nobody}"],
                             cwd=tmp_path, env=outside_the_checkout(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and f"nothing listens at 127.0.0.1:{nobody}" in refused.stderr
