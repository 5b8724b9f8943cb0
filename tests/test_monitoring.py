"""Monitoring: the model's metrics on Triton's metrics port count what clients saw; the shipped
Prometheus config and alert rules pass promtool (with a unit test for every alert); and every
Grafana panel's query returns data from a real Prometheus scraping the real server after load."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.request

import pytest
import yaml

from benchmarks.load_generator import closed_loop
from clients import InvalidInput, PatentClassifier
from core.synthetic_patents import synthetic_patents
from server.launcher import free_loopback_ports
from server.prometheus_monitor import MONITORING, Prometheus, write_config
from tests.conftest import MODEL_NAME

ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "patent-classifier.json"
# What Grafana puts in place of its variables; the windows cover the whole of the test's load,
# even when a busy machine stretches it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "10m", "$model": ".+"}


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
        "QueueTimeGrowing", "NoTraffic", "ClassShareDrift",
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


def test_the_models_metrics_have_the_documented_types(server):
    samples, types = scrape(server.metrics_url)
    expected = {
        "pc_request_count": "counter", "pc_request_success": "counter", "pc_request_failure": "counter",
        "pc_request_duration": "histogram", "pc_request_queue_duration": "histogram",
        "pc_tokenization_duration": "counter", "pc_documents": "counter", "pc_request_truncated": "counter",
        "pc_predictions": "counter", "pc_batch_next_size": "histogram", "pc_batch_next_tokens": "histogram",
        "pc_batch_padded_tokens": "histogram", "pc_batch_padding_ratio": "histogram",
        "pc_batch_inference_duration": "histogram", "pc_queue_size": "gauge", "pc_queue_tokens": "gauge",
        "pc_engine_healthy": "gauge", "pc_engine_cpu_threads": "gauge",
    }
    assert {name: types.get(name) for name in expected} == expected
    assert "nv_inference_count" in types  # beside Triton's own
    assert value(samples, "pc_engine_healthy") == 1.0
    # Every class and every error kind is a series from the start, so shares and rates are defined.
    assert len([1 for (n, ls) in samples if n == "pc_predictions" and ("model", MODEL_NAME) in ls]) == 188
    assert {dict(ls)["err"] for (n, ls) in samples if n == "pc_request_failure"} >= {
        "invalid_input", "overloaded", "deadline_exceeded", "cancelled", "engine_failure", "unavailable"
    }


def test_the_metrics_count_what_clients_saw(server):
    patents = synthetic_patents(6, seed=31, long_share=0.5)
    before, _ = scrape(server.metrics_url)
    with PatentClassifier(server.grpc_url, protocol="grpc", model=MODEL_NAME) as client:
        answers = [answer for chunk in (patents[:2], patents[2:3], patents[3:]) for answer in client.classify_batch(chunk)]
        with pytest.raises(InvalidInput):
            client.classify(patents[0], top_k=0)
    tops = [answer.labels[0].code for answer in answers]

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 15  # the metrics thread applies updates asynchronously
    while True:
        after, _ = scrape(server.metrics_url)
        if delta("pc_request_count") >= 4 and delta("pc_request_failure", err="invalid_input") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta("pc_request_count") == 4
    assert delta("pc_request_success") == 3
    assert delta("pc_request_failure", err="invalid_input") == 1
    assert delta("pc_request_failure") == 1
    assert delta("pc_request_duration_count") == 4
    assert delta("pc_documents") == len(patents)
    assert delta("pc_request_queue_duration_count") == len(patents)
    assert delta("pc_request_truncated") == sum(answer.truncated for answer in answers) > 0
    assert delta("pc_batch_next_tokens_sum") == sum(answer.token_count for answer in answers)
    assert delta("pc_batch_padded_tokens_sum") >= delta("pc_batch_next_tokens_sum")
    assert 1 <= delta("pc_batch_next_size_count") <= len(patents)
    assert delta("pc_batch_next_size_sum") == len(patents)
    assert delta("pc_tokenization_duration") > 0
    for code in set(tops):
        assert delta("pc_predictions", label=code) == tops.count(code)
    assert delta("pc_predictions") == len(patents)


# --- the dashboard against a real Prometheus ----------------------------------------------------


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


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
        load = closed_loop("monitoring", server.grpc_url, MODEL_NAME, [[p] for p in patents], concurrency=4, max_seconds=60)
        assert load.failures == 0 and load.requests == len(patents)
        # Wait until Prometheus holds the whole load (and the recording rules ran on it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            scraped = prometheus.query(f'sum(pc_request_success{{model="{MODEL_NAME}"}})')
            shares = prometheus.query("pc:predictions:share_1h")
            if scraped and float(scraped[0]["value"][1]) >= len(patents) and shares:
                break
            time.sleep(0.5)
        time.sleep(3)
        yield prometheus


@pytest.mark.parametrize("title, expr", panel_queries(), ids=[f"{t}:{e[:40]}" for t, e in panel_queries()])
def test_every_dashboard_panel_returns_data_after_load(prometheus_after_load, title, expr):
    assert_returns_data(prometheus_after_load, expr)


def test_every_metric_a_panel_names_exists_in_prometheus(prometheus_after_load):
    known = set(prometheus_after_load.get("/api/v1/label/__name__/values"))
    named = {name for _, expr in panel_queries() for name in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)}
    assert named and named <= known, f"panels name metrics Prometheus does not have: {sorted(named - known)}"


def test_a_panel_naming_a_nonexistent_metric_fails_the_check(prometheus_after_load):
    with pytest.raises(AssertionError, match="no series"):
        assert_returns_data(prometheus_after_load, 'sum by (model) (rate(pc_no_such_metric{model=~"$model"}[$__rate_interval]))')


def test_prometheus_evaluates_every_rule_without_error(prometheus_after_load):
    groups = prometheus_after_load.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 9
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []
    # Under steady load no alert is firing.
    firing = [rule["name"] for rule in rules if rule.get("state") == "firing"]
    assert firing == []
