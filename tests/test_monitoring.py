"""Monitoring: the model's metrics on Triton's metrics port count what clients saw; the shipped
Prometheus config and alert rules pass promtool (with a unit test for every alert); and every
Grafana panel's query returns data from a real Prometheus scraping the real server after load."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from benchmarks.load_generator import closed_loop
from patent_classifier_client import InvalidInput, PatentClassifier
from patent_classifier_client.errors import ErrorKind
from core.synthetic_patents import synthetic_patents
from server.launcher import free_loopback_ports
from server.prometheus_monitor import MONITORING, Prometheus, write_config
from server.triton_metrics import FAMILIES, FEEDBACK_FAMILIES, RECORD_FAMILIES
from tests.conftest import MODEL_NAME, PROJECT_ROOT

ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "patent-classifier.json"
MONITORING_DOC = PROJECT_ROOT / "docs" / "monitoring.md"
# What Grafana puts in place of its variables; the windows cover the whole of the test's load,
# even when a busy machine stretches it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "10m", "$model": ".+", "$job": ".+"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make setup` installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_accepts_the_shipped_config_and_the_one_make_monitor_writes(tmp_path):
    shipped = promtool("check", "config", str(MONITORING / "prometheus.yml"))
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert "SUCCESS" in shipped.stdout
    written = promtool("check", "config", str(write_config("127.0.0.1:18002", tmp_path / "prometheus.yml", "1s", "1s")))
    assert written.returncode == 0, written.stdout + written.stderr


def test_promtool_accepts_the_alert_rules():
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def alert_names() -> set[str]:
    return {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"] if "alert" in rule}


def test_the_alerts_the_office_asked_for_exist():
    assert alert_names() == {
        "TritonServerDown", "ModelNotReady", "HighErrorRate", "P99LatencyAboveTarget",
        "QueueTimeGrowing", "NoTraffic", "ClassShareDrift", "ConfidenceDrop", "LiveAccuracyDrop",
        "PredictionRecordsBacklog", "PredictionJournalFilling", "PredictionRecordsNotStored",
    }


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert fired == alert_names()
    assert quiet == alert_names()


def test_promtool_unit_tests_of_the_alerts_pass():
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# --- the metrics on Triton's port ---------------------------------------------------------------

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def scrape(url: str) -> tuple[dict[tuple[str, frozenset], float], dict[str, str]]:
    """Samples keyed by (name, labels) and the declared type of each family, from the text format."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples, types


def value(samples, name: str, **labels: str) -> float:
    wanted = {"model": MODEL_NAME, **labels}
    return sum(v for (n, ls), v in samples.items() if n == name and wanted.items() <= dict(ls).items())


def metrics_after(metrics_url: str, before, condition, timeout_s: float = 15.0):
    """The samples once ``condition(delta)`` holds, or after ``timeout_s`` (the metrics thread
    applies updates behind the answers), and ``delta(name, **labels)``: a sample's change since ``before``."""
    deadline = time.monotonic() + timeout_s
    while True:
        after, _ = scrape(metrics_url)

        def delta(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        if condition(delta) or time.monotonic() > deadline:
            return after, delta
        time.sleep(0.2)


def documented_metrics() -> tuple[dict[str, str], set[str]]:
    """The metric table of docs/monitoring.md: {name: type}, and the `err` values its failure row lists."""
    rows = re.findall(r"^\| `(pc_[a-z_]+)(?:\{\w+\})?` \| (counter|gauge|histogram) \| (.*) \|$", MONITORING_DOC.read_text(), re.M)
    failure_row = next(what for name, _, what in rows if name == "pc_requests_failed_total")
    return {name: kind for name, kind, _ in rows}, set(re.findall(r"`([a-z_]+)`", failure_row.partition("`err`:")[2]))


@pytest.mark.server
def test_the_documented_metric_list_is_exactly_what_the_server_exposes(server):
    samples, types = scrape(server.metrics_url)
    documented, documented_errors = documented_metrics()
    exposed = {name: kind for name, kind in types.items() if name.startswith("pc_")}
    assert documented == exposed
    assert documented_errors == {dict(labels)["err"] for (name, labels) in samples if name == "pc_requests_failed_total"}
    assert documented_errors == {kind.value for kind in ErrorKind}
    assert "nv_inference_count" in types  # beside Triton's own
    assert value(samples, "pc_engine_healthy") == 1.0
    # Every class and every error kind is a series from the start, so shares and rates are defined.
    assert len([1 for (n, ls) in samples if n == "pc_predictions_total" and ("model", MODEL_NAME) in ls]) == 188


def test_every_metric_name_follows_prometheus_conventions():
    """Counters end in _total (and one of seconds in _seconds_total); a family that counts or
    measures seconds says so; nothing else ends like a histogram's own series or a counter."""
    for name, (kind, help_text, _) in {**FAMILIES, **RECORD_FAMILIES, **FEEDBACK_FAMILIES}.items():
        assert re.fullmatch(r"pc_[a-z_]+", name), name
        if kind == "COUNTER":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith(("_total", "_count", "_sum", "_bucket")), name
        in_seconds = help_text.startswith("Seconds")
        assert in_seconds == name.endswith(("_seconds", "_seconds_total")), (name, help_text)
        # Every gauge and histogram names its unit, or is a 0/1 state, or an info metric (constant 1,
        # its facts in labels, named _info as Prometheus' own are).
        if kind != "COUNTER":
            assert name.endswith(("_seconds", "_documents", "_tokens", "_bytes", "_ratio", "_threads", "_healthy", "_info")), name
    assert FAMILIES["pc_queue_tokens"][0] == "GAUGE"  # the autoscaler's metric keeps its name


@pytest.mark.server
def test_the_metrics_count_what_clients_saw(server):
    patents = synthetic_patents(6, seed=31, long_share=0.5)
    before, _ = scrape(server.metrics_url)
    with PatentClassifier(server.grpc_url, protocol="grpc", model=MODEL_NAME) as client:
        answers = [answer for chunk in (patents[:2], patents[2:3], patents[3:]) for answer in client.classify_batch(chunk)]
        with pytest.raises(InvalidInput):
            client.classify(patents[0], top_k=0)
    tops = [answer.labels[0].code for answer in answers]

    # Every kind of event counted below: the metrics thread applies them in the order they were
    # queued, and an answer's own update may trail the next request the client sent.
    after, delta = metrics_after(server.metrics_url, before, lambda d: (
        d("pc_requests_total") >= 4 and d("pc_requests_failed_total", err="invalid_input") >= 1
        and d("pc_requests_succeeded_total") >= 3 and d("pc_predictions_total") >= len(patents)
        and d("pc_batch_documents_sum") >= len(patents)
    ))
    assert delta("pc_requests_total") == 4
    assert delta("pc_requests_succeeded_total") == 3
    assert delta("pc_requests_failed_total", err="invalid_input") == 1
    assert delta("pc_requests_failed_total") == 1
    assert delta("pc_request_duration_seconds_count") == 4
    assert delta("pc_documents_total") == len(patents)
    assert delta("pc_request_queue_duration_seconds_count") == len(patents)
    assert delta("pc_documents_truncated_total") == sum(answer.truncated for answer in answers) > 0
    assert delta("pc_batch_tokens_sum") == sum(answer.token_count for answer in answers)
    assert delta("pc_batch_padded_tokens_sum") >= delta("pc_batch_tokens_sum")
    assert 1 <= delta("pc_batch_documents_count") <= len(patents)
    assert delta("pc_batch_documents_sum") == len(patents)
    assert delta("pc_tokenization_seconds_total") > 0
    for code in set(tops):
        assert delta("pc_predictions_total", label=code) == tops.count(code)
    assert delta("pc_predictions_total") == len(patents)


# --- the dashboard against a real Prometheus ----------------------------------------------------


def panel_queries(gpu: bool = False) -> list[tuple[str, str]]:
    """(title, expression) of every panel's query: those on Triton's GPU metrics (nv_gpu_*), which a
    server without a GPU does not export, with ``gpu``; the others without."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]
            if ("nv_gpu_" in target["expr"]) == gpu]


def walk(node, path: str = ""):
    """Every (path, key, value) of a JSON document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path, key, child
        yield from walk(child, f"{path}/{key}")


def assert_portable(dashboard: dict) -> None:
    """Imported into a Grafana whose Prometheus has another uid, or scraping Triton under another
    job, every panel must still work: data sources come from the `datasource` variable, jobs from `job`."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert [(entry["type"], entry["pluginId"]) for entry in dashboard["__inputs"]] == [("datasource", "prometheus")]
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        assert panel.get("datasource") == chosen, f"panel {panel['title']}: {panel.get('datasource')}"
        for target in panel["targets"]:
            assert target.get("datasource") == chosen, f"panel {panel['title']} target {target['refId']}: {target.get('datasource')}"
    body = {key: part for key, part in dashboard.items() if key != "__inputs"}
    for path, key, source in walk(body):  # variables, and anything a later edit adds
        assert key != "datasource" or source == chosen, f"{path}: {source}"
    # Only the import dialog fills ${DS_PROMETHEUS}; provisioning would leave it as it is.
    assert "DS_PROMETHEUS" not in json.dumps(body)
    queries = [value for _, key, value in walk(body) if key in ("expr", "definition") and isinstance(value, str)]
    queries += [value["query"] for _, key, value in walk(body) if key == "query" and isinstance(value, dict)]
    for query in queries:
        assert set(re.findall(r'\bjob\s*(?:=~|!~|!=|=)\s*"([^"]*)"', query)) <= {"$job"}, query


def test_the_dashboard_names_no_data_source_or_job_of_its_own():
    assert_portable(json.loads(DASHBOARD.read_text()))


@pytest.mark.parametrize("where, change, words", [
    ("target", lambda d: d["panels"][3]["targets"][0].update(datasource={"type": "prometheus", "uid": "prometheus"}), "Time in queue target A"),
    ("panel", lambda d: d["panels"][0].pop("datasource"), "panel Throughput"),
    ("variable", lambda d: d["templating"]["list"][2].update(datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}), "templating/list/2"),
    ("job", lambda d: d["panels"][-2]["targets"][0].update(expr='up{job="triton"}'), "triton"),
])
def test_the_portability_check_catches_a_hard_coded_source_or_job(where, change, words):
    dashboard = json.loads(DASHBOARD.read_text())
    change(dashboard)
    with pytest.raises(AssertionError, match=words):
        assert_portable(dashboard)


def as_grafana_sends(expr: str) -> str:
    for variable, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, replacement)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def assert_returns_data(prometheus: Prometheus, expr: str) -> None:
    result = prometheus.query(as_grafana_sends(expr))
    assert result, f"no series: {expr}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(v) for v in values), f"only NaN/Inf: {expr} -> {values}"


@pytest.fixture(scope="module")
def prometheus_after_load(server, tmp_path_factory):
    port, = free_loopback_ports(1)
    metrics = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    with Prometheus(metrics, port, tmp_path_factory.mktemp("prometheus"), scrape_interval="1s", evaluation_interval="1s") as prometheus:
        deadline = time.monotonic() + 30
        while not prometheus.query('up{job="triton"} == 1') and time.monotonic() < deadline:
            time.sleep(0.5)
        patents = synthetic_patents(48, seed=5, long_share=0.3)
        load = closed_loop("monitoring", server.grpc_url, MODEL_NAME, [[p] for p in patents], concurrency=4, max_seconds=math.inf)
        assert load.failures == 0 and load.requests == len(patents)
        with PatentClassifier(server.grpc_url, model=MODEL_NAME) as client:  # examiners confirm one answer, correct another
            confirmed, corrected = client.classify_batch(synthetic_patents(2, seed=6))
            client.submit_feedback(confirmed.prediction_id, confirmed.labels[0].code)
            client.submit_feedback(corrected.prediction_id, corrected.labels[1].code)
        # Wait until Prometheus holds the whole load (and the recording rules ran on it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scraped = prometheus.query(f'sum(pc_requests_succeeded_total{{model="{MODEL_NAME}"}})')
            shares = prometheus.query("pc:predictions:share_1h")
            accuracy = prometheus.query(f'pc_live_accuracy_ratio{{model="{MODEL_NAME}"}}')
            if scraped and float(scraped[0]["value"][1]) >= len(patents) and shares and accuracy:
                break
            time.sleep(0.5)
        time.sleep(3)
        yield prometheus


@pytest.mark.server
@pytest.mark.tools
@pytest.mark.parametrize("title, expr", panel_queries(), ids=[f"{t}:{e[:40]}" for t, e in panel_queries()])
def test_every_dashboard_panel_returns_data_after_load(prometheus_after_load, title, expr):
    assert_returns_data(prometheus_after_load, expr)


@pytest.mark.server
@pytest.mark.tools
def test_every_metric_a_panel_names_exists_in_prometheus(prometheus_after_load):
    known = set(prometheus_after_load.get("/api/v1/label/__name__/values"))
    named = {name for _, expr in panel_queries() for name in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)}
    assert {"up", "pc_requests_total", "pc_queue_tokens"} <= named  # per-pod panels among them
    assert named and named <= known, f"panels name metrics Prometheus does not have: {sorted(named - known)}"


@pytest.mark.server
@pytest.mark.tools
def test_a_panel_naming_a_nonexistent_metric_fails_the_check(prometheus_after_load):
    with pytest.raises(AssertionError, match="no series"):
        assert_returns_data(prometheus_after_load, 'sum by (model) (rate(pc_no_such_metric{model=~"$model"}[$__rate_interval]))')


@pytest.mark.server
@pytest.mark.tools
def test_prometheus_evaluates_every_rule_without_error(prometheus_after_load):
    groups = prometheus_after_load.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len([rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]])
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    # Under steady load no alert is firing.
    firing = [rule["name"] for rule in rules if rule.get("state") == "firing"]
    assert firing == []


# What Triton exports per GPU on a GPU machine (docs/monitoring.md), for the GPU panels' check below:
# two GPUs of one pod, as tritonserver's metrics port lists them.
GPU_EXPOSITION = """\
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-7d4b0c2e-0000-0000-0000-000000000000"} 0.83
nv_gpu_utilization{gpu_uuid="GPU-7d4b0c2e-0000-0000-0000-000000000001"} 0.79
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-7d4b0c2e-0000-0000-0000-000000000000"} 85899345920
nv_gpu_memory_total_bytes{gpu_uuid="GPU-7d4b0c2e-0000-0000-0000-000000000001"} 85899345920
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-7d4b0c2e-0000-0000-0000-000000000000"} 21474836480
nv_gpu_memory_used_bytes{gpu_uuid="GPU-7d4b0c2e-0000-0000-0000-000000000001"} 20401094656
"""


def test_the_gpu_panels_read_metrics_the_real_tritonserver_exports():
    """The names come from the tritonserver these tests run (its library holds each as a string, or
    in pieces of at most 15 bytes where the compiler inlined the short ones), not from memory."""
    import importlib.util

    library = next(Path(importlib.util.find_spec("pytriton").submodule_search_locations[0]).parent.glob(
        "nvidia_pytriton.libs/libtritonserver*.so"))
    binary = library.read_bytes()
    named = {name for _, expr in panel_queries(gpu=True) for name in re.findall(r"(nv_gpu_[a-z_]+)\{", expr)}
    assert named == {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
    for name in named:
        assert name.encode() in binary or name[:15].encode() in binary, name
    assert b"gpu_uuid" in binary  # the label the panels group by


@pytest.mark.tools
@pytest.mark.parametrize("title, expr", panel_queries(gpu=True), ids=[f"{t}:{e[:40]}" for t, e in panel_queries(gpu=True)])
def test_every_gpu_panel_returns_data_from_a_real_prometheus(tmp_path, title, expr):
    """No GPU here, so no tritonserver exports nv_gpu_*: a real Prometheus scrapes those series, in
    Triton's exposition (GPU_EXPOSITION), from a loopback endpoint, and every GPU panel's query must
    return a finite value from it."""
    import http.server
    import threading

    class Exposition(http.server.BaseHTTPRequestHandler):
        scraped = 0

        def do_GET(self):
            body = GPU_EXPOSITION.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            Exposition.scraped += 1

        def log_message(self, *args):
            pass

    endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Exposition)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    port, = free_loopback_ports(1)
    try:
        with Prometheus(f"127.0.0.1:{endpoint.server_address[1]}", port, tmp_path, scrape_interval="1s", evaluation_interval="1s") as prometheus:
            deadline = time.monotonic() + 30
            while not prometheus.query('nv_gpu_utilization{job="triton"}') and time.monotonic() < deadline:
                time.sleep(0.5)
            assert Exposition.scraped > 0, "Prometheus never scraped the GPU exposition"
            assert_returns_data(prometheus, expr)
    finally:
        endpoint.shutdown()


# --- make monitor ---------------------------------------------------------------------------------


@pytest.mark.tools
def test_the_links_make_monitor_prints_answer_on_the_prometheus_it_starts(tmp_path):
    (port, nobody_listens) = free_loopback_ports(2)
    monitor = subprocess.Popen(
        [sys.executable, "-m", "server.prometheus_monitor", "--triton-metrics", f"127.0.0.1:{nobody_listens}",
         "--port", str(port), "--data", str(tmp_path / "prometheus")],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        printed = [monitor.stdout.readline() for _ in range(5)]  # the banner and one line per page
        links = dict(line.split() for line in printed[1:])
        assert set(links) == {"graph", "alerts", "targets", "rules"}, printed
        for page, link in links.items():
            assert link.startswith(f"http://127.0.0.1:{port}/")
            with urllib.request.urlopen(link, timeout=10) as answer:
                assert answer.status == 200, (page, link)
                assert "Prometheus" in answer.read().decode()
    finally:
        monitor.terminate()
        assert monitor.wait(timeout=60) == 0
