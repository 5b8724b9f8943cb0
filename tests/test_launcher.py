"""`python -m server`, as `make serve` runs it."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pytest

from patent_classifier_client import PatentClassifier
from core.synthetic_patents import synthetic_patents
from core.serving_config import ServingConfig
from export.triton_package import write_triton_model
from server.launcher import (
    LaunchConfig, PortUnavailable, ServerNotReady, TritonServer, build_python_backend_directory, check_ports, free_loopback_ports,
)
from server.model_watchdog import process_tree, still_running, stub_processes
from tests.conftest import LLAMA_MODEL, MODEL_NAME, PROJECT_ROOT

pytestmark = pytest.mark.server  # python -m server as make serve runs it


def test_backend_folder_links_the_wheels_python_backend(tmp_path):
    python_dir = build_python_backend_directory(tmp_path) / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"):
        entry = python_dir / name
        assert entry.is_symlink() and entry.resolve().is_file()
    assert f"python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/" in str(
        (python_dir / "triton_python_backend_stub").resolve()
    )


def model_is_ready(http_port: int, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/ready", timeout=5) as answer:
            return answer.status == 200
    except urllib.error.HTTPError:
        return False


def test_serve_prints_endpoints_and_drains_requests_in_flight_on_sigterm(exported, tmp_path):
    """With a models file, the server loads the models it lists and no other folder of the repository,
    and its one model's "auto" CPU threads are every usable core; SIGTERM answers the requests in
    flight before it exits."""
    gemma2 = exported.models.model(MODEL_NAME)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        f"models:\n  - {{name: {MODEL_NAME}, base: {gemma2.base}, adapter: {gemma2.adapter}, labels: {gemma2.labels}, "
        f"serving: {{max_length: {gemma2.serving.max_length}}}}}\n",
        encoding="utf-8",
    )
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model-repository", str(exported.repository), "--models-file", str(models_file),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
        output = "".join(lines)
        assert f"http://127.0.0.1:{http_port}" in output and f"127.0.0.1:{grpc_port}" in output
        assert model_is_ready(http_port, MODEL_NAME)
        assert not model_is_ready(http_port, LLAMA_MODEL)  # exported into the repository, but not listed
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        assert "nv_inference_request_success" in metrics
        threads = f'pc_engine_cpu_threads{{model="{MODEL_NAME}",model_instance="{MODEL_NAME}_0_0"}} {len(os.sched_getaffinity(0))}\n'
        assert threads in metrics

        # SIGTERM with requests in flight: each is answered before the server exits.
        patents = synthetic_patents(24, seed=41, long_share=1.0)

        def classify(index: int):
            protocol, port = ("grpc", grpc_port) if index % 2 == 0 else ("http", http_port)
            with PatentClassifier(f"127.0.0.1:{port}", protocol, MODEL_NAME, timeout_s=120) as client:
                return client.classify(patents[index])

        with ThreadPoolExecutor(len(patents)) as pool:
            in_flight = [pool.submit(classify, index) for index in range(len(patents))]
            wait(in_flight, return_when=FIRST_COMPLETED)  # the engine is busy with them
            assert not all(future.done() for future in in_flight), "all answered before SIGTERM: nothing was in flight"
            process.send_signal(signal.SIGTERM)
            answers = [future.result(timeout=120) for future in in_flight]
        assert [answer.token_count for answer in answers] == [512] * len(patents)
        assert process.wait(timeout=60) == 0
        assert "tritonserver stopped (exit code 0)" in process.stdout.read()
    finally:
        if process.poll() is None:  # a failed assertion: stop it the way that also stops its tritonserver
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_serve_refuses_an_empty_repository(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "no model folders" in result.stderr


def test_serve_refuses_a_models_file_naming_an_unexported_model(exported, tmp_path):
    models_file = tmp_path / "models.yaml"
    models_file.write_text("models:\n  - {name: not-exported, base: /nowhere, serving: {max_length: 64}}\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(exported.repository), "--models-file", str(models_file)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "['not-exported']" in result.stderr and "make export" in result.stderr


def test_stopping_ends_a_stub_that_tritonserver_left_behind(exported, tmp_path):
    """A tritonserver that does not answer SIGTERM (frozen here with SIGSTOP; in production a hung
    shutdown) is killed after its exit timeout, and then cannot stop its stubs: the launcher ends
    them rather than leave the model's memory held by orphans."""
    repository = tmp_path / "repository"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=512, max_batch_tokens=4096, device="cpu"
    ))
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    config = LaunchConfig(
        model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        backend_directory=tmp_path / "backends", ready_timeout_s=180, exit_timeout_s=1,
    )
    server = TritonServer(config, log_path=tmp_path / "tritonserver.log").start()
    [stub] = stub_processes(server.process.pid)
    tree = process_tree(server.process.pid)
    os.kill(server.process.pid, signal.SIGSTOP)
    server.stop()
    assert stub.pid in {pid for pid, _ in tree}
    survivors = [(pid, Path(f"/proc/{pid}/stat").read_text()) for pid, start in tree if still_running(pid, start)]
    assert survivors == []


def one_model_file(exported, folder: Path) -> Path:
    gemma2 = exported.models.model(MODEL_NAME)
    models_file = folder / "models.yaml"
    models_file.write_text(
        f"models:\n  - {{name: {MODEL_NAME}, base: {gemma2.base}, adapter: {gemma2.adapter}, labels: {gemma2.labels}, "
        f"serving: {{max_length: {gemma2.serving.max_length}}}}}\n",
        encoding="utf-8",
    )
    return models_file


def processes_serving(repository: Path) -> list[tuple[int, str]]:
    """(pid, start) of the live processes whose command line names ``repository``: tritonserver and
    its stubs (a stub's first argument is its model.py there), wherever they were moved."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            command = Path(f"/proc/{name}/cmdline").read_bytes()
            start = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            continue
        if str(repository).encode() in command and still_running(int(name), start):
            found.append((int(name), start))
    return found


def end_them(processes) -> None:
    for pid, start in processes:
        if still_running(pid, start):
            os.kill(pid, signal.SIGKILL)


def test_a_port_in_use_fails_the_start_at_once_naming_its_flag(exported, tmp_path):
    """Before any model loads: tritonserver would load every model and only then fail on the port."""
    http_port, metrics_port = free_loopback_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server", "--model-repository", str(exported.repository),
             "--models-file", str(one_model_file(exported, tmp_path)),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1
    assert f"server failed to start: --grpc-port {grpc_port}: 127.0.0.1:{grpc_port} is already in use\n" in result.stderr
    assert "starting" not in result.stderr  # tritonserver never started, so no model loaded
    with pytest.raises(PortUnavailable, match=r"--http-port and --metrics-port are all \d+"):
        check_ports(LaunchConfig(model_repository=tmp_path, http_port=http_port, grpc_port=grpc_port, metrics_port=http_port))


def test_a_start_that_fails_after_the_models_loaded_ends_the_stubs_it_started(exported, tmp_path, monkeypatch):
    """The port taken between the launcher's check and tritonserver's own bind (the check passed
    over here): tritonserver loads the model, fails on gRPC and exits, and its stubs go with it."""
    from server import launcher

    repository = tmp_path / "repository"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=512, max_batch_tokens=4096, device="cpu"
    ))
    checks = []
    monkeypatch.setattr(launcher, "check_ports", checks.append, raising=False)
    http_port, metrics_port = free_loopback_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = LaunchConfig(
            model_repository=repository, http_port=http_port, grpc_port=taken.getsockname()[1], metrics_port=metrics_port,
            backend_directory=tmp_path / "backends", ready_timeout_s=180,
        )
        server = TritonServer(config, log_path=tmp_path / "tritonserver.log")
        try:
            with pytest.raises(ServerNotReady, match="tritonserver exited"):
                server.start()
            log = (tmp_path / "tritonserver.log").read_text(errors="replace")
            assert "successfully loaded" in log and "already in use" in log  # loaded, then failed on the port
            survivors = processes_serving(repository)
        finally:
            end_them(processes_serving(repository))
    assert len(checks) <= 1 and survivors == []


def test_an_unexpected_tritonserver_exit_ends_its_stubs_and_the_launcher_with_them(exported, tmp_path):
    """tritonserver killed (a crash, the OOM killer): `python -m server` says so, ends what it left
    running (stubs holding the model's memory), and exits 1 so a supervisor restarts it."""
    repository = tmp_path / "repository"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=512, max_batch_tokens=4096, device="cpu"
    ))
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    errors = tmp_path / "stderr"  # a file: a pipe would stay open as long as a leftover stub inherits it
    with errors.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--model-repository", str(repository),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    try:
        for line in process.stdout:
            if "Ctrl-C" in line:
                break
        [server_pid] = [pid for pid, _ in process_tree(process.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"]
        stubs = stub_processes(server_pid)
        assert stubs, "no stub was running"
        os.kill(server_pid, signal.SIGKILL)
        assert process.wait(timeout=120) == 1
        assert "tritonserver exited unexpectedly" in errors.read_text()
        assert processes_serving(repository) == []
    finally:
        if process.poll() is None:
            process.kill()
        end_them(processes_serving(repository))


def test_a_server_is_ready_only_once_its_metrics_endpoint_answers_too(tmp_path):
    """tritonserver starts its metrics endpoint after its HTTP one: a launcher that took HTTP's
    "ready" alone returned a server whose first scrape could be refused."""
    import http.server
    import threading

    class Answers200(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    def listening(port):
        listener = http.server.ThreadingHTTPServer(("127.0.0.1", port), Answers200)
        threading.Thread(target=listener.serve_forever, daemon=True).start()
        return listener

    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    server = TritonServer(LaunchConfig(model_repository=tmp_path, http_port=http_port, grpc_port=grpc_port,
                                       metrics_port=metrics_port))
    server._triton_http_port = http_port  # as start() sets it, without starting a tritonserver
    health = listening(http_port)
    try:
        assert not server.is_ready()  # HTTP answers, the metrics port refuses
        metrics = listening(metrics_port)
        try:
            assert server.is_ready()
        finally:
            metrics.shutdown()
            metrics.server_close()
    finally:
        health.shutdown()
        health.server_close()
