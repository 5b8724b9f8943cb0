"""Start the real ``tritonserver`` on a model repository and keep it healthy until told to stop.

Two ways to get the binary: the ``nvidia-pytriton`` wheel ships tritonserver 2.51 with the
Python backend (used here, on CPU machines without NVIDIA's container), or a ``tritonserver``
on ``PATH`` (NVIDIA's container, where the backends live in /opt/tritonserver/backends).

For the wheel's server we build a backend folder of our own with *symlinks* to the wheel's
Python backend: its stub finds CUDA stubs through an RPATH relative to its real location,
so a copied stub fails to load and the server hangs at "loading" with no port open.

Security: with a certificate and key, gRPC speaks TLS (Triton's own ``--grpc-use-ssl``) and
HTTP becomes HTTPS through ``server.tls_front`` (Triton 2.51's HTTP endpoint has no TLS: it is
then bound to loopback on a private port behind the front). The metrics endpoint stays plain
HTTP, for Prometheus on the same host or network.

Triton's administrative APIs (the repository API above all: its load request takes a model's
files, ``model.py`` among them, and runs them) are closed on every launch, token or not, by its
restricted-API options with a key made for that launch, which only this object and its
watchdog hold. With an access token, inference needs it: Triton forwards the request's
``authorization`` header to the model as a request parameter, and the model checks it
(``server.token_check``). The token reaches tritonserver through its environment, never its
command line. The launch key is on that command line (Triton takes it nowhere else), where users
of the same host can read it (docs/operations.md says what that means and what to do). A network
address (anything but loopback) needs a token, or ``insecure_no_token`` saying the network is
private by other means.

Start and end: the three ports are checked before tritonserver starts (it would load every model
first, for minutes with a large one, and only then fail on a port in use), and tritonserver runs
in a session of its own, so whatever it starts (the Python-backend stubs, vLLM's engine cores)
stays in its process group however it ends: on every stop, and when it exits unexpectedly, the
launcher ends what is left of that group (the stubs ignore SIGTERM, so SIGKILL).
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from patent_classifier_client import access_token
from patent_classifier_client.feedback_protocol import FEEDBACK_MODEL
from server.cpu_share import CPU_ENGINES_ENV, cpu_engines_of
from server.model_watchdog import DeadStubWatchdog, answers_200, end_leftovers, process_group, process_tree
from server.tls_front import TlsFront, server_tls_context

PROJECT_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


# The cloud storage Triton 2.51 reads a model repository from (Amazon S3, Google Cloud Storage, Azure).
REMOTE_REPOSITORY_SCHEMES = ("s3://", "gs://", "as://")


def is_remote_repository(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(REMOTE_REPOSITORY_SCHEMES)


def source_paths(checkout: Path) -> list[Path]:
    """Where a checkout's code is imported from: the server side at its root, the client
    distribution (patent_classifier_client, which the server imports) in clients/."""
    return [checkout, checkout / "clients"]


class LaunchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_repository: Path | str = Field(
        description="a folder, or a bucket Triton reads itself: s3://bucket/path, gs://bucket/path, as://account/container/path"
    )
    address: str = Field(
        "127.0.0.1", description="address the three endpoints bind to; 0.0.0.0 to serve a network (then a token, or insecure_no_token)"
    )
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    tritonserver: str = Field("wheel", description="'wheel' (nvidia-pytriton's), 'path' (tritonserver on PATH) or a file")
    backend_directory: Path = PROJECT_ROOT / "build" / "triton_backends"
    ready_timeout_s: float = Field(600.0, gt=0, description="model loading of a 9B model from disk takes minutes")
    exit_timeout_s: int = Field(30, ge=0, description="how long Triton drains requests in flight on shutdown")
    log_verbose: int = Field(0, ge=0)
    models: tuple[str, ...] = Field(
        (), description="serve exactly these models (Triton's explicit model control); empty: every model in the repository"
    )
    tls_certificate: Path | None = Field(None, description="PEM server certificate (chain): gRPC and HTTP then need TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_certificate")
    token: SecretStr | None = Field(None, description="inference requires 'authorization: Bearer <token>'")
    insecure_no_token: bool = Field(
        False, description="serve a network address without a token: only for a network that is private by other means"
    )
    reload_dead_models: bool = Field(
        True, description="reload a model whose Python-backend stub died (runs Triton with --model-control-mode=explicit)"
    )
    grpc_max_connection_age_s: float | None = Field(
        None, gt=0, description="seconds a client's gRPC connection may live before the server sends GOAWAY: the "
        "client then re-resolves its dns:/// name, so replicas added since get traffic; None: forever"
    )
    grpc_max_connection_age_grace_s: float | None = Field(
        None, ge=0, description="seconds the calls in flight on a connection past its age may take to finish before it "
        "is closed; None: as long as they take"
    )

    @field_validator("model_repository", mode="before")
    @classmethod
    def _folder_or_bucket(cls, value: object) -> object:
        # A bucket URI stays a string: as a Path, "s3://bucket" would lose a slash.
        if isinstance(value, str) and not is_remote_repository(value):
            return Path(value)
        return value

    @model_validator(mode="after")
    def _certificate_and_key_together(self) -> "LaunchConfig":
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("tls_certificate and tls_key: give both for TLS, or neither")
        for field in ("tls_certificate", "tls_key"):
            path = getattr(self, field)
            if path is not None and not path.is_file():
                raise ValueError(f"{field}: {path} is not a file")
        return self

    @model_validator(mode="after")
    def _grace_needs_an_age(self) -> "LaunchConfig":
        if self.grpc_max_connection_age_grace_s is not None and self.grpc_max_connection_age_s is None:
            raise ValueError("grpc_max_connection_age_grace_s: a grace applies to connections past their age; "
                             "give grpc_max_connection_age_s too")
        return self

    @field_validator("token")
    @classmethod
    def _token_is_usable(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            access_token.validate_token(token.get_secret_value(), "token")
        return token

    @model_validator(mode="after")
    def _a_network_address_needs_a_token(self) -> "LaunchConfig":
        if self.token is None and not self.insecure_no_token and not is_loopback(self.address):
            raise ValueError(
                f"--address {self.address} serves a network, and no access token is set: whoever reaches the ports "
                f"could use the models. Give a token (--token-file FILE, or ${access_token.TOKEN_ENV}), or, on a network "
                "that is private by other means, say so with --insecure-no-token"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_certificate is not None

    @property
    def cpu_engines(self) -> int:
        """Engines the server runs on the CPU: every CPU instance of the models it loads (the
        listed ones, else every model folder of the repository), at least 1. The feedback model
        computes nothing."""
        if isinstance(self.model_repository, str):
            return max(1, len(self.models))  # a bucket cannot be read before Triton reads it: one engine a model
        listed = [self.model_repository / name / "config.pbtxt" for name in self.models]
        configs = listed or self.model_repository.glob("*/config.pbtxt")
        return max(1, sum(cpu_engines_of(config) for config in configs if config.exists() and config.parent.name != FEEDBACK_MODEL))


def is_loopback(address: str) -> bool:
    """``address`` can be reached from this host only (a host name other than localhost counts as a network)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# Triton's API groups (its --http-restricted-api names) that no inference caller needs, closed on
# every launch with a key made for it (docs/operations.md has the table of every endpoint): the
# repository API (its load takes a model's files and runs them, its unload stops a served model,
# its index lists every folder and why it failed to load), shared-memory registration (an inference
# caller's buffers on this host), and the trace and log settings (they write files and change what
# is logged). Health, metadata, model-config and statistics stay open: the client library reads a
# model's configuration and lists the served models from statistics; inference is checked by the
# models themselves when there is a token.
ADMINISTRATIVE_APIS = ("model-repository", "shared-memory", "trace", "logging")
# The header that carries the launch key; over gRPC Triton expects it prefixed (ADMIN_GRPC_HEADER).
ADMIN_HEADER = "patent-classifier-admin-key"
ADMIN_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"


def _wheel_tritonserver_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def build_python_backend_directory(target: Path) -> Path:
    """``target/python/`` holding symlinks to the wheel's Python backend and the stub for this Python."""
    wheel = _wheel_tritonserver_root()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": wheel / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": wheel / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": wheel / "python_backend_stubs" / python_version / "triton_python_backend_stub",
    }
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.exists():
            raise FileNotFoundError(f"the nvidia-pytriton wheel has no {source} (Python {python_version} unsupported?)")
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target


def _command(config: LaunchConfig, admin_key: str, triton_http_port: int | None = None) -> list[str]:
    """The tritonserver command line; ``admin_key``: what opens the administrative APIs for this launch;
    ``triton_http_port``: where Triton's plain HTTP listens behind the TLS front."""
    if config.tritonserver == "wheel":
        binary = str(_wheel_tritonserver_root() / "bin" / "tritonserver")
        backend_args = ["--backend-directory", str(build_python_backend_directory(config.backend_directory))]
    else:
        binary = shutil.which("tritonserver") if config.tritonserver == "path" else config.tritonserver
        if not binary or not Path(binary).exists():
            raise FileNotFoundError(f"tritonserver: {config.tritonserver!r} not found")
        backend_args = []  # the container's own backend directory
    return [
        binary,
        "--model-repository", str(config.model_repository if isinstance(config.model_repository, str) else config.model_repository.resolve()),
        *backend_args,
        *(["--http-address", "127.0.0.1", "--http-port", str(triton_http_port)] if config.tls
          else ["--http-address", config.address, "--http-port", str(config.http_port)]),
        "--grpc-address", config.address, "--grpc-port", str(config.grpc_port),
        "--metrics-address", config.address, "--metrics-port", str(config.metrics_port),
        "--exit-timeout-secs", str(config.exit_timeout_s),
        "--log-verbose", str(config.log_verbose),
        *_model_control_args(config),
        *_connection_age_args(config),
        *(["--grpc-use-ssl=true", f"--grpc-server-cert={config.tls_certificate.resolve()}",
           f"--grpc-server-key={config.tls_key.resolve()}"] if config.tls else []),
        *_restricted_api_args(admin_key),
        *_token_forward_args(config),
    ]


def _model_control_args(config: LaunchConfig) -> list[str]:
    # Explicit model control serves exactly the listed models, and lets the watchdog reload a
    # model whose stub died (through the repository API, which mode "none" refuses).
    if config.models:
        return ["--model-control-mode=explicit", *(f"--load-model={name}" for name in config.models)]
    return ["--model-control-mode=explicit", "--load-model=*"] if config.reload_dead_models else []


def _connection_age_args(config: LaunchConfig) -> list[str]:
    # tritonserver 2.51 takes both in milliseconds (its --help; gRPC's max_connection_age_ms and
    # max_connection_age_grace_ms channel arguments); gRPC adds ±10 % jitter to the age.
    arguments = []
    if config.grpc_max_connection_age_s is not None:
        arguments.append(f"--grpc-max-connection-age={max(1, round(config.grpc_max_connection_age_s * 1000))}")
    if config.grpc_max_connection_age_grace_s is not None:
        arguments.append(f"--grpc-max-connection-age-grace={round(config.grpc_max_connection_age_grace_s * 1000)}")
    return arguments


def _restricted_api_args(admin_key: str) -> list[str]:
    # Triton's help says "<apis>,<key>=<value>"; 2.51 takes "<apis>:<key>=<value>".
    rule = f"{','.join(ADMINISTRATIVE_APIS)}:{ADMIN_HEADER}={admin_key}"
    return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]


def _token_forward_args(config: LaunchConfig) -> list[str]:
    # The models check the token (server.token_check): Triton hands them the header that carries it.
    if config.token is None:
        return []
    return [f"--http-header-forward-pattern={access_token.FORWARD_PATTERN}",
            f"--grpc-header-forward-pattern={access_token.FORWARD_PATTERN}"]


def describe_command(command: list[str]) -> str:
    """The command line as it may be logged: the launch key left out."""
    return " ".join(
        argument.rsplit("=", 1)[0] + "=***" if argument.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))
        else argument
        for argument in command
    )


def _environment(config: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    # The models read the token from here (server.token_check), whichever way the launcher got it.
    env.pop(access_token.TOKEN_ENV, None)
    if config.token is not None:
        env[access_token.TOKEN_ENV] = config.token.get_secret_value()
    # For the PyTorch engines' cpu_threads "auto": the stubs share the cores (server.cpu_share).
    env[CPU_ENGINES_ENV] = str(config.cpu_engines)
    # The Python backend's stub takes sys.path from the `python` found first on PATH: put this
    # interpreter's environment (where torch, transformers and this project live) first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The stub links libpython3.X.so.1.0 by soname. Without this it may load the system's copy
    # (Debian's 3.11.2) while importing the standard library of this interpreter (e.g. pyenv's
    # 3.11.7), whose C extensions then fail: "_ssl...so: undefined symbol: _PyModule_Add".
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and Path(libdir, sysconfig.get_config_var("LDLIBRARY")).exists():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join([*map(str, source_paths(PROJECT_ROOT)), *filter(None, [env.get("PYTHONPATH")])])
    return env


def free_loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now, for servers started by tests and benchmarks."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ServerNotReady(RuntimeError):
    pass


class PortUnavailable(ServerNotReady):
    """A port the server would listen on is taken (or cannot be bound): found before tritonserver starts."""


def check_ports(config: LaunchConfig) -> None:
    """Each of the server's three ports can be listened on at ``config.address``, and they differ;
    else ``PortUnavailable`` naming the port's flag. Bound with SO_REUSEADDR, as tritonserver's
    listeners are, so a port held only by connections closing (TIME_WAIT) counts as free."""
    ports = {"--http-port": config.http_port, "--grpc-port": config.grpc_port, "--metrics-port": config.metrics_port}
    flags_of: dict[int, list[str]] = {}
    for flag, port in ports.items():
        flags_of.setdefault(port, []).append(flag)
    for port, flags in flags_of.items():
        if len(flags) > 1:
            raise PortUnavailable(f"{' and '.join(flags)} are all {port}: each endpoint needs a port of its own")
    for flag, port in ports.items():
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                config.address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror as exc:
            raise PortUnavailable(f"--address {config.address}: not an address of this machine ({exc.strerror})") from None
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on: {exc.strerror}"
                raise PortUnavailable(f"{flag} {port}: {config.address}:{port} {why}") from None


@dataclass
class TritonServer:
    """A running tritonserver process (with its TLS front and stub watchdog when configured).
    Use as a context manager, or ``start()`` / ``stop()``."""

    config: LaunchConfig
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    startup_seconds: float | None = None
    watchdog: DeadStubWatchdog | None = None
    _front: TlsFront | None = None
    _triton_http_port: int | None = None  # Triton's own HTTP port: the public one, or the loopback one behind the front
    _admin_key: str | None = None  # opens the administrative APIs of the running launch; made anew by each start()

    @property
    def http_url(self) -> str:
        return f"{self._host()}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._host()}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._host()}:{self.config.metrics_port}/metrics"

    @property
    def triton_http_url(self) -> str:
        """Triton's plain HTTP endpoint (behind the TLS front when there is one), for health probes."""
        return f"127.0.0.1:{self._triton_http_port}" if self.config.tls else self.http_url

    def _host(self) -> str:
        return "127.0.0.1" if self.config.address in ("0.0.0.0", "::") else self.config.address

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """What opens Triton's administrative APIs (ADMINISTRATIVE_APIS) of this launch, for its
        watchdog and for tests; nothing outside this process has it."""
        if self._admin_key is None:
            raise ServerNotReady("the server has not been started")
        return {ADMIN_GRPC_HEADER if protocol == "grpc" else ADMIN_HEADER: self._admin_key}

    def start(self) -> "TritonServer":
        started = time.monotonic()
        check_ports(self.config)
        self._triton_http_port = free_loopback_ports(1)[0] if self.config.tls else self.config.http_port
        self._admin_key = secrets.token_urlsafe(32)
        command = _command(self.config, self._admin_key, self._triton_http_port)
        log.info("starting %s", describe_command(command))
        # The child writes to its own copy of the log's descriptor; ours closes once it has started.
        # A session of its own: its process group then holds everything it starts (stop() ends what is left).
        with open(self.log_path, "wb") if self.log_path else contextlib.nullcontext() as output:
            self.process = subprocess.Popen(
                command, env=_environment(self.config), stdout=output,
                stderr=subprocess.STDOUT if output else None, start_new_session=True,
            )
        try:
            self.wait_until_ready()
            if self.config.tls:
                context = server_tls_context(self.config.tls_certificate, self.config.tls_key)
                self._front = TlsFront(self.config.address, self.config.http_port, self._triton_http_port, context).start()
            if self.config.reload_dead_models:
                self.watchdog = DeadStubWatchdog(self.process.pid, self.triton_http_url, self.admin_headers()).start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def is_ready(self) -> bool:
        """Triton's HTTP endpoint says ready, and its metrics endpoint answers: tritonserver starts
        that one last, after HTTP, so a scrape right after a bare HTTP probe can be refused."""
        return answers_200(f"http://{self.triton_http_url}/v2/health/ready", timeout_s=2) and answers_200(self.metrics_url, timeout_s=2)

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise ServerNotReady(f"tritonserver exited with code {self.process.returncode if self.process else None}{where}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerNotReady(f"tritonserver not ready after {self.config.ready_timeout_s:.0f} s")

    def stop(self) -> int | None:
        """SIGTERM (Triton drains requests in flight for up to exit_timeout_s), then SIGKILL if it hangs;
        then whatever tritonserver started and left running is ended, also after it exited on its own.
        The TLS front stays up until Triton has exited, so HTTPS requests in flight are answered too."""
        if self.watchdog is not None:
            self.watchdog.stop()  # a stub stopping at shutdown is no fault to recover from
        tree: list[tuple[int, str]] = []
        try:
            if self.process is None or self.process.poll() is not None:
                return None if self.process is None else self.process.returncode
            tree = process_tree(self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(self.config.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        finally:
            if self.process is not None:
                # Its group outlives it while a member lives, so its id names no other process until then.
                end_leftovers(sorted(set(tree) | set(process_group(self.process.pid))))
            if self._front is not None:
                self._front.stop()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
