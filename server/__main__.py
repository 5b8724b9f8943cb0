"""python -m server: serve a model repository with the real tritonserver until Ctrl-C or SIGTERM.

    python -m server --model-repository model_repository [--models-file models.yaml]
        [--http-port 8000 --grpc-port 8001 --metrics-port 8002]
        [--tls-certificate server.pem --tls-key server.key] [--token-file token.txt]
        [--grpc-max-connection-age 300 --grpc-max-connection-age-grace 120]

With --models-file the server loads exactly the models that file lists (each must have been
exported into the repository); without it, every model folder in the repository.
The access token comes from --token-file or $PATENT_CLASSIFIER_TOKEN, never from the command line.
An --address other than loopback needs a token, or --insecure-no-token.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from patent_classifier_client import access_token
from patent_classifier_client.command_line import HelpFormatter
from core.models_file import ModelsFile, ModelsFileError
from server.launcher import LaunchConfig, ServerNotReady, TritonServer, is_remote_repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model-repository", default="model_repository",
        help="the exported repository: a folder, or s3://, gs://, as:// (Triton reads the bucket itself)",
    )
    parser.add_argument(
        "--address", default="127.0.0.1",
        help="bind address of all endpoints (0.0.0.0 to serve a network: then a token, or --insecure-no-token)",
    )
    parser.add_argument("--http-port", type=int, default=8000, help="KServe v2 over HTTP")
    parser.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 over gRPC")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (nv_inference_*, pc_*)")
    parser.add_argument(
        "--tritonserver", default="wheel",
        help="'wheel': the tritonserver of the nvidia-pytriton wheel; 'path': the one on PATH (NVIDIA's container); or a file",
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    parser.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain requests in flight on shutdown")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level (0: quiet)")
    parser.add_argument("--models-file", type=Path, help="serve exactly the models this file lists (see models.yaml)")
    parser.add_argument("--tls-certificate", type=Path, help="PEM server certificate: gRPC with TLS, HTTPS instead of HTTP")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-certificate")
    parser.add_argument(
        "--token-file", type=Path,
        help=f"file holding the access token that inference requires (else ${access_token.TOKEN_ENV}; neither: no token)",
    )
    parser.add_argument(
        "--insecure-no-token", action="store_true",
        help="serve a network --address with no token: anyone who reaches the ports can classify. Only for a "
        "network that is private by other means (a service mesh that authorizes callers, say)",
    )
    parser.add_argument(
        "--no-model-reload", dest="reload_dead_models", action="store_false",
        help="do not reload a model whose Python-backend stub died (without --models-file, Triton's model control mode stays 'none')",
    )
    parser.add_argument(
        "--grpc-max-connection-age", type=float, default=None, metavar="SECONDS",
        help="close each client's gRPC connection (GOAWAY) after this many seconds, so clients of a dns:/// name re-resolve "
        "it and reach replicas added since (tritonserver's flag of the same name, which takes milliseconds); default: never",
    )
    parser.add_argument(
        "--grpc-max-connection-age-grace", type=float, default=None, metavar="SECONDS",
        help="seconds the calls in flight on a connection past its age may take to finish; default: as long as they take",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    remote = is_remote_repository(args.model_repository)
    if not remote:
        args.model_repository = Path(args.model_repository)
        if not any(args.model_repository.glob("*/config.pbtxt")):
            parser.error(f"--model-repository {args.model_repository}: no model folders (run `make export` first)")
    models: tuple[str, ...] = ()
    if args.models_file is not None:
        try:
            models = tuple(ModelsFile.read(args.models_file).triton_models)
        except ModelsFileError as exc:
            parser.error(str(exc))
        missing = [] if remote else [name for name in models if not (args.model_repository / name / "config.pbtxt").exists()]
        if missing:
            parser.error(
                f"--models-file {args.models_file} lists {missing}, which {args.model_repository} does not hold: "
                "export them first (make export)"
            )
    try:
        token = access_token.read_token(args.token_file)
    except access_token.TokenError as exc:
        parser.error(str(exc))
    try:
        config = LaunchConfig(
            model_repository=args.model_repository, address=args.address, http_port=args.http_port,
            grpc_port=args.grpc_port, metrics_port=args.metrics_port, tritonserver=args.tritonserver,
            ready_timeout_s=args.ready_timeout, exit_timeout_s=args.exit_timeout, log_verbose=args.log_verbose,
            models=models,
            tls_certificate=args.tls_certificate, tls_key=args.tls_key, token=token, insecure_no_token=args.insecure_no_token,
            reload_dead_models=args.reload_dead_models,
            grpc_max_connection_age_s=args.grpc_max_connection_age, grpc_max_connection_age_grace_s=args.grpc_max_connection_age_grace,
        )
    except ValidationError as exc:
        parser.error("\n".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" if error["loc"] else error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        ))

    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())

    server = TritonServer(config)
    try:
        server.start()
    except (ServerNotReady, FileNotFoundError) as exc:
        print(f"server failed to start: {exc}", file=sys.stderr)
        return 1
    scheme = "https" if config.tls else "http"
    print(
        f"ready in {server.startup_seconds:.1f} s: "
        f"{', '.join(models) if models else 'the models'} from {config.model_repository}\n"
        f"  HTTP     {scheme}://{server.http_url}   (KServe v2: POST /v2/models/<model>/infer)\n"
        f"  gRPC     {server.grpc_url}{' (TLS)' if config.tls else ''}\n"
        f"  metrics  {server.metrics_url}\n"
        f"  access   {'inference requires the token (authorization: Bearer ...)' if token else 'no token: inference is open to whoever reaches the ports'}\n"
        "Ctrl-C to stop.",
        flush=True,
    )
    while not stop_requested.wait(1.0):
        if server.process.poll() is not None:
            print(f"tritonserver exited unexpectedly with code {server.process.returncode}", file=sys.stderr)
            server.stop()  # ends the stubs (and vLLM engine cores) it left running
            return 1
    print("stopping: draining requests in flight ...", flush=True)
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
