"""`python -m server`, as `make serve` runs it."""
import signal
import subprocess
import sys
import time
import urllib.request

from server.launcher import build_python_backend_directory, free_loopback_ports
from tests.conftest import PROJECT_ROOT


def test_backend_folder_links_the_wheels_python_backend(tmp_path):
    python_dir = build_python_backend_directory(tmp_path) / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"):
        entry = python_dir / name
        assert entry.is_symlink() and entry.resolve().is_file()
    assert f"python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/" in str(
        (python_dir / "triton_python_backend_stub").resolve()
    )


def test_serve_prints_endpoints_and_stops_cleanly_on_sigterm(exported, tmp_path):
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model-repository", str(exported.repository),
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
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/kscst-gemma2/ready", timeout=5) as answer:
            assert answer.status == 200
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
