"""Run Prometheus beside a tritonserver, on loopback, with this project's config and rules.

``monitoring/prometheus.yml`` is the shipped config; here its scrape target (and, for tests, its
intervals) are rewritten for the server at hand and written into the run's own data folder, so
Prometheus is never run as a system service and never touches /etc or /var/lib.

    python -m server.prometheus_monitor --triton-metrics 127.0.0.1:8002 --port 9090   # make monitor
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from patent_classifier_client.command_line import HelpFormatter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MONITORING = PROJECT_ROOT / "monitoring"
SHIPPED_CONFIG = MONITORING / "prometheus.yml"
# The pages an operator opens. Upstream's React UI serves them at /graph, /alerts, ...; Debian's
# build ships without it and serves only the classic pages, under /classic/ (its /alerts is a 404).
CONSOLE_PAGES = ("graph", "alerts", "targets", "rules")


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed: `make setup` installs Debian's package (apt-get install prometheus)")
    return binary


def write_config(target: str, out: Path, scrape_interval: str | None = None, evaluation_interval: str | None = None) -> Path:
    """The shipped config, scraping ``target`` (host:port of Triton's metrics), rules by absolute path."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["rule_files"] = [str((MONITORING / name).resolve()) for name in config["rule_files"]]
    (triton,) = [job for job in config["scrape_configs"] if job["job_name"] == "triton"]
    triton["static_configs"] = [{"targets": [target]}]
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
    if evaluation_interval:
        config["global"]["evaluation_interval"] = evaluation_interval
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@dataclass
class Prometheus:
    """A Prometheus process on 127.0.0.1:``port`` with its data in ``data_dir``. A context manager."""

    triton_metrics: str  # host:port of tritonserver's metrics endpoint
    port: int
    data_dir: Path
    scrape_interval: str | None = None
    evaluation_interval: str | None = None
    ready_timeout_s: float = 60.0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        config = write_config(
            self.triton_metrics, self.data_dir / "prometheus.yml", self.scrape_interval, self.evaluation_interval
        )
        log = open(self.data_dir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with code {self.process.returncode}; see {self.data_dir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {self.ready_timeout_s:.0f} s")

    def page_links(self) -> dict[str, str]:
        """The address of each page in ``CONSOLE_PAGES`` on this Prometheus, in the form it serves."""
        links = {}
        for page in CONSOLE_PAGES:
            for path in (f"/{page}", f"/classic/{page}"):
                try:
                    with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as answer:
                        if answer.status == 200:
                            links[page] = f"{self.url}{path}"
                            break
                except urllib.error.HTTPError:
                    continue
        return links

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:
            raise ValueError(f"{expr}: {error.read().decode()}") from None
        if body["status"] != "success":
            raise ValueError(f"{expr}: {body}")
        return body["data"]["result"]

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as answer:
            return json.load(answer)["data"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.prometheus_monitor", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--triton-metrics", default="127.0.0.1:8002", help="host:port of tritonserver's metrics endpoint")
    parser.add_argument("--port", type=int, default=9090, help="Prometheus's own port, on 127.0.0.1")
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT / "build" / "prometheus", help="config copy and TSDB")
    args = parser.parse_args(argv)
    with Prometheus(args.triton_metrics, args.port, args.data) as prometheus:
        pages = "".join(f"\n  {page:<8} {link}" for page, link in prometheus.page_links().items())
        print(f"prometheus on {prometheus.url} scraping {args.triton_metrics}; Ctrl-C stops{pages}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            prometheus.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
