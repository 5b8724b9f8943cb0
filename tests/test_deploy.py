"""The container file and the Kubernetes files of deploy/: `make deploy-check` passes on them and
fails on each kind of mistake it exists to catch; the chart's command line, probes and autoscaling
metric work against the real server; the image's base is the server version the project runs."""
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

from core.access_token import TOKEN_ENV, validate_token
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
    assert any("ScaledObject" in problem and "at /spec/minReplicaCount: '1' is not of type 'integer'" in problem for problem in problems), problems


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


def test_a_base_image_of_another_server_version_fails_the_check(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    shutil.copy(manifest_check.DOCKERFILE, dockerfile)
    _replace(dockerfile, "FROM nvcr.io/nvidia/tritonserver:24.10-py3", "FROM nvcr.io/nvidia/tritonserver:24.09-py3")
    problems = manifest_check.check_dockerfile(dockerfile).problems
    assert problems == [
        "Dockerfile: FROM nvcr.io/nvidia/tritonserver:24.09-py3; the pinned tritonserver 2.51.0 "
        "(nvidia-pytriton in requirements-nodeps.txt) is nvcr.io/nvidia/tritonserver:24.10-py3"
    ]
    requirements = tmp_path / "requirements-nodeps.txt"
    requirements.write_text("numpy==1.26.4\nnvidia-pytriton==0.0.1\n", encoding="utf-8")
    problems = manifest_check.check_dockerfile(manifest_check.DOCKERFILE, requirements).problems
    assert len(problems) == 1 and "nvidia-pytriton 0.0.1 is not in PYTRITON_SERVER_VERSION" in problems[0]


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
    assert manifest_check.expected_base_image(metadata["version"]) in manifest_check.DOCKERFILE.read_text(encoding="utf-8")


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
    from clients.__main__ import EXIT_BAD_INPUT

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
        "so `pip install .[server]` fails in deploy/Dockerfile"
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
