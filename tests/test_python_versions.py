"""The code runs on the oldest Python that pyproject.toml declares: NVIDIA's Triton 24.10
container, which serves the project in production, ships Python 3.10, while development
machines run newer ones, where a 3.11-only call would pass every other test."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What runs inside the container (benchmarks, the deploy check and the tests run on development machines).
PACKAGES = ["core", "server", "export", "clients"]


def test_no_code_needs_a_newer_python_than_declared():
    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    oldest = re.fullmatch(r">=\s*(3\.\d+)", declared.split("#")[0].strip()).group(1)
    folders = [str(PROJECT_ROOT / package) for package in PACKAGES if (PROJECT_ROOT / package).is_dir()]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vermin"), "--no-tips", "--violations", "--eval-annotations", f"-t={oldest}-", *folders],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"code that needs a Python newer than {oldest}:\n{result.stdout}{result.stderr}"
