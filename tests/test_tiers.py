"""The fast tier (`make test-fast`, `pytest --fast`) stays fast by what it imports, not by a stopwatch:
collecting it imports no heavy stack, and its guards refuse a run that does and a test that uses
a fixture building models or starting servers without a marker saying so."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

UNMARKED_SLOW_TEST = '''
def test_uses_the_export_without_saying_so(exported):
    pass
'''
FAST_TEST_THAT_IMPORTS = '''
def test_imports_a_heavy_stack_inside():
    import selenium
'''


def pytest_run(*arguments: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *map(str, arguments)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )


def collected(run: subprocess.CompletedProcess) -> int:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return int(re.search(r"^(\d+)(?:/\d+)? tests? collected", run.stdout, re.M)[1])


def test_collecting_the_fast_tier_imports_no_heavy_stack():
    assert collected(pytest_run("--fast", "--collect-only", "-q")) > 100


def test_a_fast_run_that_imports_a_heavy_stack_fails_naming_it():
    # Any importable module loads as a plugin, as a module with fast tests could import it at its top;
    # selenium's package is the quickest of the heavy stacks to import (torch takes seconds).
    run = pytest_run("--fast", "--collect-only", "-q", "-p", "selenium")
    assert run.returncode != 0
    assert "collecting the fast tier imported selenium" in run.stdout + run.stderr


def test_a_test_using_a_slow_fixture_without_a_marker_is_refused(tmp_path):
    run = with_the_suites_conftest(tmp_path, "test_unmarked.py", UNMARKED_SLOW_TEST, "--collect-only")
    assert run.returncode != 0
    assert "test_unmarked.py::test_uses_the_export_without_saying_so uses demo_models, exported, family_demos" in run.stdout + run.stderr


def test_a_fast_test_that_imports_a_heavy_stack_fails_naming_it(tmp_path):
    run = with_the_suites_conftest(tmp_path, "test_imports.py", FAST_TEST_THAT_IMPORTS, "--fast")
    assert run.returncode == 1
    assert "test_imports.py::test_imports_a_heavy_stack_inside imported selenium: mark it slow" in run.stdout


def with_the_suites_conftest(folder: Path, name: str, source: str, *arguments: str) -> subprocess.CompletedProcess:
    """pytest on a test module written outside tests/, with the suite's conftest as a plugin (its
    fixtures and guards)."""
    module = folder / name
    module.write_text(source, encoding="utf-8")
    return pytest_run(*arguments, "-q", "-p", "tests.conftest", "--rootdir", folder, module)


@pytest.mark.model  # collecting every module imports torch, transformers and vLLM (in the subprocess)
def test_the_fast_tier_is_exactly_what_not_slow_selects():
    """--fast does not import the modules marked slow as a whole; selecting `not slow` from every
    module must give the same tests."""
    fast = pytest_run("--fast", "--collect-only", "-q")
    not_slow = pytest_run("-m", "not slow", "--collect-only", "-q")
    assert collected(fast) == collected(not_slow)
    test_ids = lambda run: sorted(line for line in run.stdout.splitlines() if "::" in line)
    assert test_ids(fast) == test_ids(not_slow)
