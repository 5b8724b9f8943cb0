"""`python -m server`, as `make serve` runs it."""
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from server.launcher import build_python_backend_directory, free_loopback_ports
from tests.conftest import LLAMA_MODEL, MODEL_NAME, PROJECT_ROOT


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


def test_serve_prints_endpoints_and_stops_cleanly_on_sigterm(exported, tmp_path):
    """With a models file, the server loads the models it lists and no other folder of the repository."""
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
            assert b"nv_inference_request_success" in answer.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "tritonserver stopped (exit code 0)" in process.stdout.read()
    finally:
        if process.poll() is None:
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
