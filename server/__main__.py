"""python -m server: serve a model repository with the real tritonserver until Ctrl-C or SIGTERM.

    python -m server --model-repository model_repository [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from server.launcher import LaunchConfig, ServerNotReady, TritonServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--address", default="127.0.0.1", help="bind address of all endpoints (0.0.0.0 to serve a network)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--tritonserver", default="wheel",
        help="'wheel': the tritonserver of the nvidia-pytriton wheel; 'path': the one on PATH (NVIDIA's container); or a file",
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    parser.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain requests in flight on shutdown")
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)

    if not any(args.model_repository.glob("*/config.pbtxt")):
        parser.error(f"--model-repository {args.model_repository}: no model folders (run `make export` first)")
    try:
        config = LaunchConfig(
            model_repository=args.model_repository, address=args.address, http_port=args.http_port,
            grpc_port=args.grpc_port, metrics_port=args.metrics_port, tritonserver=args.tritonserver,
            ready_timeout_s=args.ready_timeout, exit_timeout_s=args.exit_timeout, log_verbose=args.log_verbose,
        )
    except ValidationError as exc:
        parser.error(str(exc))

    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())

    server = TritonServer(config)
    try:
        server.start()
    except (ServerNotReady, FileNotFoundError) as exc:
        print(f"server failed to start: {exc}", file=sys.stderr)
        return 1
    print(
        f"ready in {server.startup_seconds:.1f} s: models in {config.model_repository}\n"
        f"  HTTP     http://{server.http_url}   (KServe v2: POST /v2/models/<model>/infer)\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n"
        "Ctrl-C to stop.",
        flush=True,
    )
    while not stop_requested.wait(1.0):
        if server.process.poll() is not None:
            print(f"tritonserver exited unexpectedly with code {server.process.returncode}", file=sys.stderr)
            return 1
    print("stopping: draining requests in flight ...", flush=True)
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
