"""`make pod-check`: the chart's pod, rendered by Helm, run on this machine under its own constraints.

    python -m deploy.pod_check [--values values-cpu-demo.yaml] [--work build/pod-check]

Kubernetes cannot run here, but what a pod's process meets can be: Helm renders the chart (the
values file plus the settings below, as `helm install --set` would), and the container of the
Deployment's pod template is started the way the kubelet starts it:

- its command and arguments: the image's ENTRYPOINT and CMD (read from deploy/Dockerfile) as the
  container's ``command``/``args`` override them; its environment: the image's ENV, then the
  container's ``env`` with Secrets (made here from test values) and the downward API resolved;
- its file system, through Debian's bubblewrap: this machine's root read-only
  (``readOnlyRootFilesystem``), a fresh folder per emptyDir (kept when the container restarts, as
  the kubelet keeps them), the model claim as the exported repository, read-only, each Secret as its
  files, /dev/shm as the pod's memory volume; nothing else writable;
- its identity: ``runAsUser``/``runAsGroup`` in a user namespace, no capabilities, no new
  privileges, its own PID (the entrypoint is PID 1), IPC and UTS (host name = the pod's name)
  namespaces; the whole check runs in a network namespace of its own, the pod's network, where the
  pod's ports are its own and only loopback exists;
- its probes, polled as the kubelet polls them (initial delay, period, timeout, success and failure
  thresholds; liveness and readiness only once the startup probe has succeeded), and the check fails
  where the kubelet would restart the container or take the pod out of its Services.

The image is not here, so its paths are mapped onto this machine, each printed at the start: its
python3 with the project installed is this interpreter with the checkout on PYTHONPATH (read-only,
like everything outside the pod's volumes, and bound back read-only where a volume such as /tmp
covers it), and /opt/tritonserver (NVIDIA's tritonserver and its
Python backend) is the nvidia-pytriton wheel's tritonserver with the launcher's backend folder.

Then, through the pod's ports: classify and correct with prediction records on and PostgreSQL (a
real one, password from the chart's Secret) as the records database; stop PostgreSQL and classify
through the outage, for longer than any probe would take to give up; bring it back and see every
record arrive; stop it again, kill the container process (SIGKILL) with records waiting in its
journal, bring PostgreSQL back, start the container again on the same volumes and see the restarted
process deliver them; then the kubelet's stop: the preStop hook, SIGTERM, and an exit within
``terminationGracePeriodSeconds``.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import random
import secrets as secret_tokens
import shutil
import signal
import ssl
import subprocess
import tempfile
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deploy.manifest_check import CHART, DOCKERFILE, NAMESPACE, ROOT, _quiet_symlink_notes, rendered_objects
from server.launcher import source_paths

IN_POD_NETWORK = "PATENT_CLASSIFIER_POD_CHECK_NETWORK"
# NVIDIA's Triton image: tritonserver and its backends, and the PATH the image sets.
IMAGE_TRITON = Path("/opt/tritonserver")
IMAGE_PATH = "/opt/tritonserver/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MODEL = "kscst-gemma2"  # the models file's model that pod-check exports and serves
RECORDS_USER, RECORDS_DATABASE = "records", "records"


class PodCheckFailed(Exception):
    pass


def say(status: str, line: str) -> None:
    print(f"{status:<5} {line}", flush=True)


# --- the image ------------------------------------------------------------------------------------


@dataclass
class ImageFacts:
    """What the Dockerfile gives the container: entrypoint, default arguments, environment, user."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    user: str

    @classmethod
    def from_dockerfile(cls, path: Path = DOCKERFILE) -> "ImageFacts":
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        facts = cls([], [], {}, "/", "0")
        for line in text.splitlines():
            instruction, _, rest = line.strip().partition(" ")
            instruction = instruction.upper()
            if instruction == "ENTRYPOINT":
                facts.entrypoint = json.loads(rest)
            elif instruction == "CMD":
                facts.cmd = json.loads(rest)
            elif instruction == "ENV":
                for assignment in rest.split():
                    key, _, value = assignment.partition("=")
                    facts.env[key] = value.strip('"')
            elif instruction == "WORKDIR":
                facts.workdir = rest.strip()
            elif instruction == "USER":
                facts.user = rest.strip()
        if not facts.entrypoint:
            raise PodCheckFailed(f"{path}: no ENTRYPOINT in exec form")
        return facts


# --- the rendered pod -----------------------------------------------------------------------------


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _set_value(values: dict, dotted: str, value) -> dict:
    keys = dotted.split(".")
    override = node = {}
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return _merge(values, override)


@dataclass
class RenderedPod:
    values: dict
    objects: list[dict]
    deployment: dict

    @property
    def spec(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        return self.spec["containers"][0]

    @property
    def ports(self) -> dict[str, int]:
        return {port["name"]: port["containerPort"] for port in self.container.get("ports", [])}


def render_pod(chart: Path, values_file: Path, settings: dict[str, object]) -> RenderedPod:
    """The chart rendered with ``values_file`` and ``settings`` (dotted keys, as `helm --set` takes
    them), after Helm's strict lint applies the chart's schema to the values."""
    import helm_python as helm

    values = helm.values_from_yaml(values_file.read_text(encoding="utf-8"))
    for key, value in settings.items():
        values = _set_value(values, key, value)
    with _quiet_symlink_notes():
        linted = helm.lint(chart, values, strict=True)
        problems = [f"{m['path']}: {m['error'].strip()}" for m in linted["messages"] if m["severity"] >= 2] + list(linted["errors"])
        if problems:
            raise PodCheckFailed(f"helm lint --strict refuses {values_file.name} with {settings}: " + "; ".join(problems))
        objects = [obj for _, obj in rendered_objects(chart, values)]
    [deployment] = [obj for obj in objects if obj["kind"] == "Deployment"]
    return RenderedPod(values, objects, deployment)


def pod_name(deployment: dict) -> str:
    """A name like the ReplicaSet controller gives: <deployment>-<template hash>-<5 characters>."""
    rng = random.Random(json.dumps(deployment["spec"]["template"], sort_keys=True))
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' rand.String alphabet
    return f"{deployment['metadata']['name']}-{''.join(rng.choices(alphabet, k=10))}-{''.join(rng.choices(alphabet, k=5))}"


# --- Secrets from test values ---------------------------------------------------------------------


@dataclass
class TestSecrets:
    """The Secrets the pod mounts: those the chart renders itself (the access token it generates at
    install), as rendered; the others, which an operator creates with `kubectl create secret` before
    the pods can start (docs/kubernetes.md), made here from test values."""

    token: str = field(default_factory=lambda: secret_tokens.token_urlsafe(32))
    database_password: str = field(default_factory=lambda: secret_tokens.token_urlsafe(18))
    ca: Path | None = None

    def contents(self, pod: RenderedPod, work: Path) -> dict[str, dict[str, bytes]]:
        made: dict[str, dict[str, bytes]] = {}
        auth, records, tls = (pod.values.get(key, {}) for key in ("auth", "records", "tls"))
        if auth.get("tokenSecret"):
            made.setdefault(auth["tokenSecret"], {})[auth.get("tokenSecretKey", "token")] = self.token.encode()
        if records.get("passwordSecret"):
            made.setdefault(records["passwordSecret"], {})[records.get("passwordSecretKey", "password")] = self.database_password.encode()
        if tls.get("secret"):
            from tests.tls_certificates import write_test_certificates

            certificates = write_test_certificates(work / "certificates")
            self.ca = certificates.ca
            made.setdefault(tls["secret"], {}).update({
                "tls.crt": certificates.server_certificate.read_bytes(), "tls.key": certificates.server_key.read_bytes(),
            })
        for secret in (obj for obj in pod.objects if obj["kind"] == "Secret"):
            rendered = {key: base64.b64decode(value) for key, value in secret.get("data", {}).items()}
            rendered.update({key: value.encode() for key, value in secret.get("stringData", {}).items()})
            made.setdefault(secret["metadata"]["name"], {}).update(rendered)
        return made


def token_the_server_reads(pod: RenderedPod, mounts: list["Mount"]) -> str | None:
    """The access token in the file the server's --token-file names, as the pod sees it: what a client
    of this pod must send."""
    [path] = [argument.split("=", 1)[1] for argument in pod.container.get("args", []) if argument.startswith("--token-file=")] or [None]
    if path is None:
        return None
    [mount] = [mount for mount in mounts if Path(path).is_relative_to(mount.target)]
    return (mount.source / Path(path).relative_to(mount.target)).read_text(encoding="utf-8").strip()


# --- the container, under bubblewrap --------------------------------------------------------------


@dataclass
class Mount:
    source: Path
    target: str
    writable: bool
    what: str


def _wheel_tritonserver() -> Path:
    from server.launcher import _wheel_tritonserver_root

    return _wheel_tritonserver_root() / "bin" / "tritonserver"


class PodVolumes:
    """The pod's volumes on this machine: made once per pod, so a restarted container finds its emptyDirs."""

    def __init__(self, pod: RenderedPod, work: Path, secret_contents: dict[str, dict[str, bytes]], claims: dict[str, Path]):
        self.folders: dict[str, tuple[Path, bool]] = {}  # volume name -> (folder, read-only by the volume)
        self._memory: list[Path] = []
        for volume in pod.spec.get("volumes", []):
            name = volume["name"]
            if "emptyDir" in volume:
                if volume["emptyDir"].get("medium") == "Memory":  # tmpfs, as the kubelet makes it
                    folder = Path(tempfile.mkdtemp(prefix=f"pod-check-{name}-", dir="/dev/shm"))
                    self._memory.append(folder)
                else:
                    folder = work / "volumes" / name
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                self.folders[name] = (folder, False)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in claims:
                    raise PodCheckFailed(f"volume {name}: claim {claim} has no folder here (known: {', '.join(claims)})")
                self.folders[name] = (claims[claim], bool(volume["persistentVolumeClaim"].get("readOnly")))
            elif "secret" in volume:
                secret = volume["secret"]["secretName"]
                if secret not in secret_contents:
                    raise PodCheckFailed(f"volume {name}: Secret {secret} has no test value in pod-check")
                folder = work / "secrets" / name
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                for key, content in secret_contents[secret].items():
                    (folder / key).write_bytes(content)
                    (folder / key).chmod(volume["secret"].get("defaultMode", 0o644))
                self.folders[name] = (folder, True)
            else:
                raise PodCheckFailed(f"volume {name}: pod-check knows emptyDir, persistentVolumeClaim and secret, not {sorted(volume)}")

    def mounts(self, container: dict) -> list[Mount]:
        mounts = []
        for mount in container.get("volumeMounts", []):
            folder, read_only = self.folders[mount["name"]]
            if mount.get("subPath"):
                folder = folder / mount["subPath"]
            mounts.append(Mount(folder, mount["mountPath"], not (read_only or mount.get("readOnly")), f"volume {mount['name']}"))
        return mounts

    def remove(self) -> None:
        for folder in self._memory:
            shutil.rmtree(folder, ignore_errors=True)


def _mount_point_arguments(targets: list[str]) -> tuple[list[str], list[str]]:
    """bwrap binds onto existing paths only, and the root is read-only: for a mount path whose folder
    is missing here (e.g. /etc/patent-classifier/token), the nearest existing parent is replaced by a
    tmpfs holding every entry it had (bound back read-only), the missing folders are created in it, and
    it is made read-only again once the binds are done (``--remount-ro``)."""
    shadowed, arguments, remount = set(), [], []
    for target in sorted(targets, key=lambda path: path.count("/")):
        path = Path(target)
        missing = [parent for parent in [path, *path.parents] if not parent.exists()]
        if not missing:
            continue
        parent = missing[-1].parent
        if parent in shadowed or any(parent.is_relative_to(other) for other in shadowed):
            continue
        shadowed.add(parent)
        arguments += ["--tmpfs", str(parent)]
        for entry in sorted(parent.iterdir()):
            if entry.is_symlink():
                arguments += ["--symlink", os.readlink(entry), str(entry)]
            else:
                arguments += ["--ro-bind", str(entry), str(entry)]
        remount += ["--remount-ro", str(parent)]
    return arguments + [argument for target in targets for argument in ("--dir", target) if not Path(target).exists()], remount


@dataclass
class Container:
    """One run of the pod's container: bwrap with the pod's mounts, identity and environment."""

    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    pid: int | None = None  # the entrypoint's process id on this machine (PID 1 inside)
    started: float = 0.0

    def start(self) -> "Container":
        info_read, info_write = os.pipe()
        log = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["bwrap", "--info-fd", str(info_write), *self.argv], pass_fds=(info_write,), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        os.close(info_write)
        log.close()
        with os.fdopen(info_read) as info:
            text = info.read()
        if not text:
            self.process.wait(10)
            raise PodCheckFailed(f"bwrap did not start the container (exit {self.process.returncode}): {self.log_tail()}")
        self.pid = json.loads(text)["child-pid"]
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.pid, signum)

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, characters: int = 3000) -> str:
        """The log's errors (tritonserver's "failed to load ..." lines say why a model did not load), then its end."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        errors = [line[:600] for line in text.splitlines() if "failed to load '" in line or line.startswith(("E1", "E0", "Traceback"))]
        return "\n".join([*errors[:6], "...", text[-characters:]]) if errors else text[-characters:]


def container_environment(pod: RenderedPod, image: ImageFacts, secret_contents: dict, name: str, app: Path) -> tuple[dict, dict]:
    """(the container's environment as Kubernetes gives it, what pod-check adds to map the image here)."""
    env = dict(image.env)
    env["HOSTNAME"] = name
    fields = {"metadata.name": name, "metadata.namespace": NAMESPACE, "status.podIP": "127.0.0.1", "spec.nodeName": "pod-check"}
    container = pod.container
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            env.update({key: value.decode() for key, value in secret_contents[source["secretRef"]["name"]].items()})
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "fieldRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in variable.get("valueFrom", {}):
            reference = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secret_contents[reference["name"]][reference["key"]].decode()
        else:
            raise PodCheckFailed(f"env {variable['name']}: pod-check does not resolve {variable.get('valueFrom')}")
    mapping = {
        # The image's python3 has the project installed; here the checkout on PYTHONPATH, read-only.
        "PYTHONPATH": os.pathsep.join(map(str, source_paths(app))),
        "PATH": f"{Path(sys.executable).parent}:{IMAGE_PATH}",
    }
    return env, mapping


# The project's two distributions: the client (clients/) and the server side (the root).
PROJECT_DISTRIBUTIONS = ("patent-classifier-client", "patent-classifier-serving")


def project_installation(app_pth: Path) -> dict[Path, Path]:
    """The .pth files by which this environment installs the project (an editable install's), each to
    be replaced by ``app_pth``, a .pth naming the app checkout."""
    import sysconfig
    from importlib import metadata

    purelib = [sysconfig.get_paths()["purelib"]]
    installed = [d for name in PROJECT_DISTRIBUTIONS for d in metadata.distributions(name=name, path=purelib)]
    files = [file for distribution in installed for file in distribution.files or []]
    return {Path(file.locate()).resolve(): app_pth for file in files if str(file).endswith(".pth")}


def container_argv(pod: RenderedPod, image: ImageFacts, volumes: PodVolumes, env: dict, mapping: dict, name: str, backends: Path,
                  app_pth: Path, image_sources: list[Path]) -> tuple[list[str], list[Mount]]:
    """bwrap's arguments for the pod's container. ``image_sources``: the folders of this machine that
    stand for the image's files (the app checkout, this environment, the work folder), read-only in the
    pod wherever they lie."""
    container, context = pod.container, {**pod.spec.get("securityContext", {}), **pod.container.get("securityContext", {})}
    if not context.get("readOnlyRootFilesystem"):
        raise PodCheckFailed("the container's root filesystem is writable (readOnlyRootFilesystem is not true)")
    image_user, _, image_group = image.user.partition(":")
    uid, gid = int(context.get("runAsUser", image_user or 0)), int(context.get("runAsGroup", image_group or 0))
    if context.get("runAsNonRoot") and uid == 0:
        raise PodCheckFailed("runAsNonRoot with uid 0: the kubelet refuses to start the container")
    if context.get("allowPrivilegeEscalation", True) or "ALL" not in context.get("capabilities", {}).get("drop", []):
        raise PodCheckFailed("the container may gain privileges (allowPrivilegeEscalation) or keeps capabilities")
    mounts = volumes.mounts(container)
    image_mounts = [
        Mount(_wheel_tritonserver(), str(IMAGE_TRITON / "bin" / "tritonserver"), False, "image: tritonserver (nvidia-pytriton's)"),
        Mount(backends, str(IMAGE_TRITON / "backends"), False, "image: Triton's Python backend (the launcher's backend folder)"),
    ]
    shadows, remount = _mount_point_arguments([mount.target for mount in mounts] + [str(IMAGE_TRITON / "bin")])
    argv = [
        "--die-with-parent", "--unshare-user", "--uid", str(uid), "--gid", str(gid),
        "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--hostname", name,
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *shadows,
    ]
    for mount in mounts:
        argv += ["--bind" if mount.writable else "--ro-bind", str(mount.source), mount.target]
    # A checkout cloned into /tmp lies under the pod's writable /tmp volume, which hides it: it is bound
    # back read-only over the volume, as the image's files are. A path of the export machine that
    # config.pbtxt might carry stays unwritable there, as in a real pod.
    covered = [path for path in image_sources if any(mount.writable and path.is_relative_to(mount.target) for mount in mounts)]
    for path in sorted(path for path in covered if not any(path != other and path.is_relative_to(other) for other in covered)):
        argv += ["--ro-bind", str(path), str(path)]
        image_mounts.append(Mount(path, str(path), False, "this machine's files standing for the image's, under a folder the pod writes"))
    argv += ["--symlink", str(image_mounts[0].source), image_mounts[0].target, "--ro-bind", str(backends), image_mounts[1].target]
    installations = project_installation(app_pth)
    if not installations:
        raise PodCheckFailed("the project is not installed into this environment (make setup installs it): the image's "
                             "python3 has it installed, and the Python backend's stub imports only what is installed")
    for installed, replacement in installations.items():
        # This environment's install of the project (an editable one points at its own checkout)
        # becomes a plain path entry for the app checkout: the project installed, as in the image. The
        # Python backend's stub builds its sys.path from this environment's site-packages, not from
        # PYTHONPATH, so without this a stub would import whichever checkout the environment names.
        argv += ["--ro-bind", str(replacement), str(installed)]
        image_mounts.append(Mount(replacement, str(installed), False, "image: the project installed into python3"))
    argv += [*remount, "--clearenv"]
    for key, value in {**env, **mapping}.items():
        argv += ["--setenv", key, value]
    command = container.get("command", image.entrypoint)
    arguments = container.get("args", image.cmd if "command" not in container else [])
    argv += ["--chdir", container.get("workingDir", image.workdir), "--", *command, *arguments]
    return argv, mounts + image_mounts


# --- the kubelet's probes -------------------------------------------------------------------------


@dataclass
class ProbeResult:
    at: float
    ok: bool
    detail: str


class ProbeWorker(threading.Thread):
    """One probe of one container, on the kubelet's schedule: the first try after initialDelaySeconds,
    then one every periodSeconds, each given timeoutSeconds; ``failureThreshold`` failures in a row
    fail it, ``successThreshold`` successes in a row pass it. The startup probe stops at its first
    pass or fail; the others run until stopped."""

    def __init__(self, kind: str, spec: dict, ports: dict[str, int], ca_free_tls: ssl.SSLContext):
        super().__init__(name=f"probe-{kind}", daemon=True)
        self.kind, self.spec = kind, spec
        get = spec.get("httpGet")
        if get is None:
            raise PodCheckFailed(f"{kind}: pod-check polls httpGet probes, not {sorted(set(spec) - {'periodSeconds', 'failureThreshold', 'timeoutSeconds', 'successThreshold', 'initialDelaySeconds'})}")
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        self.url = f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{port}{get.get('path', '/')}"
        self.period = spec.get("periodSeconds", 10)
        self.timeout = spec.get("timeoutSeconds", 1)
        self.failure_threshold = spec.get("failureThreshold", 3)
        self.success_threshold = spec.get("successThreshold", 1)
        self.initial_delay = spec.get("initialDelaySeconds", 0)
        self._tls = ca_free_tls
        self.results: list[ProbeResult] = []
        self.state = "unknown"  # unknown → passed / failed (startup), success / failure (the others)
        self.failed_at: float | None = None
        self._stopping = threading.Event()

    @property
    def budget_s(self) -> float:
        """How long the probe may keep failing before it fails: what the kubelet waits for."""
        return self.initial_delay + self.failure_threshold * self.period

    def probe_once(self) -> ProbeResult:
        request = urllib.request.Request(self.url, headers={"User-Agent": "kube-probe/1.37", "Accept": "*/*"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls if self.url.startswith("https") else None) as answer:
                return ProbeResult(time.monotonic(), 200 <= answer.status < 400, f"HTTP {answer.status}")
        except urllib.error.HTTPError as exc:
            return ProbeResult(time.monotonic(), 200 <= exc.code < 400, f"HTTP {exc.code}")
        except (OSError, urllib.error.URLError) as exc:  # refused, reset, timed out
            return ProbeResult(time.monotonic(), False, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")

    def run(self) -> None:
        if self._stopping.wait(self.initial_delay):
            return
        successes = failures = 0
        while True:
            result = self.probe_once()
            self.results.append(result)
            successes, failures = (successes + 1, 0) if result.ok else (0, failures + 1)
            if failures >= self.failure_threshold:
                self.state, self.failed_at = ("failed" if self.kind == "startup" else "failure"), result.at
                if self.kind != "readiness":
                    return  # the kubelet kills the container
            elif successes >= self.success_threshold:
                self.state = "passed" if self.kind == "startup" else "success"
                if self.kind == "startup":
                    return
            if self._stopping.wait(self.period):
                return

    def stop(self) -> None:
        self._stopping.set()

    def describe_last(self) -> str:
        return ", ".join(result.detail for result in self.results[-self.failure_threshold:])


class Kubelet:
    """Starts the container and keeps its probes, as the kubelet does for one pod."""

    def __init__(self, pod: RenderedPod, argv: list[str], log_path: Path):
        self.pod, self.argv, self.log_path = pod, argv, log_path
        self.container: Container | None = None
        self.workers: dict[str, ProbeWorker] = {}
        self.restarts = 0
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE  # the kubelet does not verify a probe's certificate

    def _worker(self, kind: str) -> ProbeWorker | None:
        spec = self.pod.container.get(f"{kind}Probe")
        return None if spec is None else ProbeWorker(kind, spec, self.pod.ports, self._tls)

    def start_container(self) -> float:
        """Start the container and wait for its startup probe; the seconds it took."""
        for worker in self.workers.values():
            worker.stop()
        self.container = Container(self.argv, self.log_path).start()
        startup = self._worker("startup")
        self.workers = {}
        if startup is not None:
            startup.start()
            while startup.is_alive():
                if not self.container.running():
                    startup.stop()
                    raise PodCheckFailed(
                        f"the container exited with code {self.container.process.returncode} before its startup probe "
                        f"passed: the kubelet restarts it, again and again (CrashLoopBackOff). Its log ends:\n{self.container.log_tail()}"
                    )
                startup.join(0.5)
            if startup.state != "passed":
                raise PodCheckFailed(
                    f"startup probe {startup.url} failed {startup.failure_threshold} times in a row (last: {startup.describe_last()}) "
                    f"within its budget of {startup.budget_s:.0f} s: the kubelet kills the container. Its log ends:\n{self.container.log_tail()}"
                )
        took = time.monotonic() - self.container.started
        for kind in ("readiness", "liveness"):
            worker = self._worker(kind)
            if worker is not None:
                self.workers[kind] = worker
                worker.start()
        return took

    def wait_until_ready(self) -> None:
        readiness = self.workers.get("readiness")
        deadline = time.monotonic() + (readiness.budget_s + readiness.period if readiness else 0)
        while readiness is not None and readiness.state != "success":
            self.assert_healthy()
            if time.monotonic() > deadline:
                raise PodCheckFailed(f"readiness probe {readiness.url} not passing {readiness.budget_s:.0f} s after startup: {readiness.describe_last()}")
            time.sleep(0.2)

    def assert_healthy(self) -> None:
        """Fails where the kubelet would act: the container exited, liveness failed, the pod went unready."""
        if self.container is None or not self.container.running():
            code = None if self.container is None else self.container.process.returncode
            raise PodCheckFailed(f"the container exited (code {code}): the kubelet restarts it. Its log ends:\n{self.container.log_tail() if self.container else ''}")
        for kind, worker in self.workers.items():
            if worker.state == "failure":
                consequence = "the kubelet kills and restarts the container" if kind == "liveness" else "the pod leaves its Services' endpoints"
                raise PodCheckFailed(f"{kind} probe {worker.url} failed {worker.failure_threshold} times in a row ({worker.describe_last()}): {consequence}")

    def hold(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.assert_healthy()
            time.sleep(0.5)

    def kill(self) -> None:
        """The container's process dies (SIGKILL to PID 1: the kernel ends its whole PID namespace)."""
        for worker in self.workers.values():
            worker.stop()
        self.container.signal(signal.SIGKILL)
        if self.container.wait(30) is None:
            raise PodCheckFailed("the container outlived SIGKILL")
        self.restarts += 1

    def terminate(self) -> tuple[float, int | None]:
        """The kubelet's stop: the preStop hook, then SIGTERM, all within terminationGracePeriodSeconds;
        (seconds from the start of the stop to the container's exit, its exit code; None: still running)."""
        grace = self.pod.spec.get("terminationGracePeriodSeconds", 30)
        for worker in self.workers.values():
            worker.stop()
        started = time.monotonic()
        hook = self.pod.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if hook:
            # Run in the container's namespaces, as `kubectl exec` would (nsenter into PID 1's).
            subprocess.run(["nsenter", "--target", str(self.container.pid), "--mount", "--uts", "--ipc", "--pid", "--", *hook],
                           timeout=grace, check=True)
        self.container.signal(signal.SIGTERM)
        code = self.container.wait(max(0.0, grace - (time.monotonic() - started)))
        took = time.monotonic() - started
        if code is None:
            self.container.signal(signal.SIGKILL)
            self.container.wait(30)
        return took, code

    def stop_everything(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        if self.container is not None and self.container.running():
            self.container.signal(signal.SIGKILL)
            self.container.wait(30)


# --- the records database -------------------------------------------------------------------------


class RecordsDatabase:
    """A real PostgreSQL (benchmarks/postgres_server.py) whose records role logs in with a password only."""

    def __init__(self, password: str):
        from benchmarks.postgres_server import PostgresServer

        self.server = PostgresServer().start()
        import psycopg

        with psycopg.connect(self.server.url("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE ROLE {RECORDS_USER} LOGIN PASSWORD '{password}'")
            connection.execute(f'CREATE DATABASE "{RECORDS_DATABASE}" OWNER {RECORDS_USER}')
        # Over TCP, every role needs its password (scram-sha-256); the check itself reads through the socket.
        (self.server.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n", encoding="utf-8"
        )
        with self._connect("postgres") as connection:
            connection.execute("SELECT pg_reload_conf()")

    @property
    def url(self) -> str:
        return f"postgresql://{RECORDS_USER}@127.0.0.1:{self.server.port}/{RECORDS_DATABASE}"

    def _connect(self, database: str = RECORDS_DATABASE):
        import psycopg

        return psycopg.connect(host=str(self.server.folder), port=self.server.port, user="postgres", dbname=database, autocommit=True)

    def refuses_without_password(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            return "password" in str(exc)
        return False

    def predictions(self) -> set[str]:
        with self._connect() as connection:
            exists = connection.execute("SELECT to_regclass('predictions') IS NOT NULL").fetchone()[0]
            return {row[0] for row in connection.execute("SELECT id FROM predictions")} if exists else set()

    def corrections(self) -> set[str]:
        with self._connect() as connection:
            return {row[0] for row in connection.execute("SELECT prediction_id FROM feedback")}

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def remove(self) -> None:
        self.server.remove()


# --- the check ------------------------------------------------------------------------------------


def enter_pod_network(argv: list[str]) -> None:
    """Re-run this command in a network namespace of its own, with only loopback up: the pod's ports
    (8080, 9000, 8002) are then the pod's, whatever listens on this machine, and nothing leaves it."""
    if os.environ.get(IN_POD_NETWORK):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        raise SystemExit("pod-check runs the pod in network, user and PID namespaces of its own: run it as root (as CI does)")
    os.environ[IN_POD_NETWORK] = "1"
    os.execvp("unshare", ["unshare", "--net", "--", sys.executable, "-m", "deploy.pod_check", *argv])


def export_repository(app: Path, work: Path, demo: Path | None) -> Path:
    """models.yaml's defaults and its Gemma-2 model, on the demo weights, exported by ``app``'s code
    the way `make export` exports: the repository the model claim holds."""
    python = [sys.executable]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, source_paths(app)))}
    if demo is None:
        demo = work / "demo"
        if not (demo / "gemma2-kscst-lora").exists():
            subprocess.run([*python, "-m", "export", "demo-models", "--out", str(demo), "--model", "gemma2"], cwd=app, env=env, check=True,
                           stdout=subprocess.DEVNULL)
    shipped = yaml.safe_load((app / "models.yaml").read_text(encoding="utf-8"))
    [entry] = [model for model in shipped["models"] if model["name"] == MODEL]
    entry = {**entry, "base": str(demo / "gemma2-base"), "adapter": str(demo / "gemma2-kscst-lora"), "labels": str(app / entry["labels"])}
    entry.pop("labelled_file", None)
    models_file = work / "models.yaml"
    models_file.write_text(yaml.safe_dump({"defaults": shipped.get("defaults", {}), "models": [entry]}, sort_keys=False), encoding="utf-8")
    repository = work / "model_repository"
    exported = subprocess.run([*python, "-m", "export", "models", "--models-file", str(models_file), "--repository", str(repository)],
                              cwd=app, env=env, capture_output=True, text=True)
    if exported.returncode != 0:
        raise PodCheckFailed(f"the export failed:\n{exported.stderr[-3000:]}")
    return repository


def classify(address: str, count: int, seed: int, token: str | None, ca: Path | None):
    from patent_classifier_client import PatentClassifier
    from core.synthetic_patents import synthetic_patents

    with PatentClassifier(address, model=MODEL, token=token, tls_ca=ca, timeout_s=120) as client:
        return client.classify_batch(synthetic_patents(count, seed=seed, long_share=0.3))


def correct(address: str, answer, token: str | None, ca: Path | None) -> str:
    from patent_classifier_client import PatentClassifier

    with PatentClassifier(address, model=MODEL, token=token, tls_ca=ca, timeout_s=120) as client:
        return client.submit_feedback(answer.prediction_id, answer.labels[1].code)


def wait_for(description: str, condition, timeout_s: float, kubelet: Kubelet) -> float:
    """Seconds until ``condition()`` holds, the pod kept healthy meanwhile. ``timeout_s`` only ends a
    wait that would otherwise never end (the records writer commits within seconds of an answer, or
    of the database's return); it is no speed target."""
    started = time.monotonic()
    while not condition():
        kubelet.assert_healthy()
        if time.monotonic() - started > timeout_s:
            raise PodCheckFailed(f"{description}: not after {timeout_s:.0f} s. The container's log ends:\n{kubelet.container.log_tail()}")
        time.sleep(1)
    return time.monotonic() - started


def run(args: argparse.Namespace) -> None:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    app = args.app.resolve()
    image = ImageFacts.from_dockerfile(app / "deploy" / "Dockerfile" if (app / "deploy" / "Dockerfile").exists() else DOCKERFILE)
    test_secrets = TestSecrets()
    database = RecordsDatabase(test_secrets.database_password)
    kubelet = volumes = None
    try:
        if not database.refuses_without_password():
            raise PodCheckFailed(f"PostgreSQL lets {RECORDS_USER} in without a password: the Secret's password would go untested")
        say("ok", f"PostgreSQL on 127.0.0.1:{database.server.port}; role {RECORDS_USER} logs in with its password only")
        # What an operator passes to `helm install` for this cluster: where the records database is.
        settings = {"records.database": database.url}
        pod = render_pod(args.chart, args.values, settings)
        name = pod_name(pod.deployment)
        say("ok", f"helm: {args.values.name} with " + " ".join(f"--set {k}={v}" for k, v in settings.items())
            + f" renders {len(pod.objects)} objects; pod {name}")
        if not pod.values.get("records", {}).get("database"):
            raise PodCheckFailed(f"{args.values.name}: the chart sets no records database (records.database)")
        repository = args.repository.resolve() if args.repository else export_repository(app, work, args.demo_models)
        say("ok", f"model repository: {repository} (exported from {app / 'models.yaml'} by {app}'s code)")
        secret_contents = test_secrets.contents(pod, work)
        claims = {pod.values["modelRepository"]["persistentVolumeClaim"]: repository}
        volumes = PodVolumes(pod, work, secret_contents, claims)
        env, mapping = container_environment(pod, image, secret_contents, name, app)
        from server.launcher import build_python_backend_directory

        backends = build_python_backend_directory(work / "image-backends")
        app_pth = work / "project-installed.pth"
        app_pth.write_text("".join(f"{path}\n" for path in source_paths(app)), encoding="utf-8")
        argv, mounts = container_argv(pod, image, volumes, env, mapping, name, backends, app_pth, [app, work, Path(sys.prefix).resolve()])
        context = {**pod.spec.get("securityContext", {}), **pod.container.get("securityContext", {})}
        say("ok", f"container: uid {context.get('runAsUser')} gid {context.get('runAsGroup')}, read-only root, no capabilities, "
                  f"PID 1 in its own PID namespace; command: {' '.join(pod.container.get('command', image.entrypoint) + pod.container.get('args', []))}")
        for mount in mounts:
            say("", f"  {mount.target:<45} <- {mount.source} ({'writable' if mount.writable else 'read-only'}; {mount.what})")
        say("", "  everything else: this machine's / read-only; the image's python3 with the project installed is "
                f"{sys.executable} with {app} on its path (PYTHONPATH and the .pth above)")
        token = token_the_server_reads(pod, mounts)
        grpc = f"127.0.0.1:{pod.ports['grpc']}"
        ca = test_secrets.ca
        kubelet = Kubelet(pod, argv, work / "container.log")
        (work / "container.log").write_text("")

        took = kubelet.start_container()
        startup = kubelet.pod.container["startupProbe"]
        say("ok", f"startup probe passed {took:.0f} s after the container started (budget "
                  f"{startup['failureThreshold'] * startup['periodSeconds']} s, every {startup['periodSeconds']} s, timeout {startup.get('timeoutSeconds', 1)} s)")
        kubelet.wait_until_ready()
        say("ok", "readiness probe passing: the pod is Ready")

        answers = classify(grpc, 8, seed=1, token=token, ca=ca)
        verdict = correct(grpc, answers[0], token, ca)
        ids = {answer.prediction_id for answer in answers}
        waited = wait_for("the records of 8 answers in PostgreSQL", lambda: ids <= database.predictions(), 120, kubelet)
        wait_for("the correction in PostgreSQL", lambda: answers[0].prediction_id in database.corrections(), 60, kubelet)
        say("ok", f"classified 8 patents through the pod's gRPC port {pod.ports['grpc']}, corrected one ({verdict}); "
                  f"all 8 records and the correction in PostgreSQL within {waited:.0f} s")

        # The outage lasts longer than any probe takes to give up, so a server that turns unhealthy
        # without its database would be restarted or unready within it.
        outage = max(worker.budget_s + worker.period for worker in kubelet.workers.values())
        database.stop()
        outage_answers = classify(grpc, 6, seed=2, token=token, ca=ca)
        kubelet.hold(outage)
        journal = [mount.source for mount in mounts if mount.target == env.get("PATENT_CLASSIFIER_RECORDS_JOURNAL")]
        journaled = sorted(path.name for path in journal[0].iterdir()) if journal else []
        say("ok", f"PostgreSQL stopped: 6 patents classified; the pod stayed live and Ready for {outage:.0f} s; "
                  f"journal volume holds {journaled}")
        database.start()
        outage_ids = {answer.prediction_id for answer in outage_answers}
        waited = wait_for("the records of the outage in PostgreSQL once it is back", lambda: outage_ids <= database.predictions(), 180, kubelet)
        verdict = correct(grpc, outage_answers[0], token, ca)
        say("ok", f"PostgreSQL back: the outage's 6 records arrived within {waited:.0f} s; a correction of one: {verdict}")

        database.stop()
        pending = classify(grpc, 5, seed=3, token=token, ca=ca)
        kubelet.kill()
        database.start()
        say("ok", "PostgreSQL stopped, 5 patents classified, the container killed (SIGKILL) with their records in its journal; PostgreSQL back")
        took = kubelet.start_container()
        kubelet.wait_until_ready()
        pending_ids = {answer.prediction_id for answer in pending}
        waited = wait_for("the killed container's journaled records, from the restarted one", lambda: pending_ids <= database.predictions(), 180, kubelet)
        after = classify(grpc, 3, seed=4, token=token, ca=ca)
        after_ids = {answer.prediction_id for answer in after}
        wait_for("the records of the restarted container's answers", lambda: after_ids <= database.predictions(), 120, kubelet)
        say("ok", f"container restarted on the same volumes: Ready {took:.0f} s after start; the 5 journaled records arrived "
                  f"within {waited:.0f} s of readiness; 3 more patents classified and recorded")

        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        took, code = kubelet.terminate()
        if code is None:
            raise PodCheckFailed(f"the container was still running {grace} s after the stop began: the kubelet kills it (SIGKILL). "
                                 f"Its log ends:\n{kubelet.container.log_tail()}")
        if code != 0:
            raise PodCheckFailed(f"the container exited with code {code} on SIGTERM. Its log ends:\n{kubelet.container.log_tail()}")
        say("ok", f"preStop hook, then SIGTERM: the container exited with code 0 after {took:.1f} s (terminationGracePeriodSeconds {grace})")
        every = ids | outage_ids | pending_ids | after_ids
        missing = every - database.predictions()
        if missing:
            raise PodCheckFailed(f"{len(missing)} of {len(every)} records never reached PostgreSQL")
        say("ok", f"all {len(every)} prediction records and 2 corrections are in PostgreSQL")
        # The export machine's folders mean nothing in a pod (and are read-only there when they exist).
        baked = [f"{config.parent.name}/config.pbtxt: {line.strip()}" for config in sorted(repository.glob("*/config.pbtxt"))
                 for line in config.read_text(encoding="utf-8").splitlines()
                 if any(str(folder) in line for folder in (work, app, repository.parent))]
        if baked:
            raise PodCheckFailed("the export wrote this machine's paths into config.pbtxt: " + "; ".join(baked))
        say("ok", "config.pbtxt holds no path of the machine that exported it")
    finally:
        if kubelet is not None:
            kubelet.stop_everything()
        if volumes is not None:
            volumes.remove()
        database.remove()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m deploy.pod_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chart", type=Path, default=CHART, help="the Helm chart")
    parser.add_argument("--values", type=Path, default=CHART / "values-cpu-demo.yaml", help="the values file whose pod runs")
    parser.add_argument("--app", type=Path, default=ROOT, help="the checkout whose code the image holds (read-only in the pod)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "pod-check", help="the pod's volumes, the export, the log")
    parser.add_argument("--repository", type=Path, help="an exported model repository for the model claim (default: export one)")
    parser.add_argument("--demo-models", type=Path, help="built demo models to export from (default: build them under --work)")
    args = parser.parse_args(argv)
    enter_pod_network(argv)
    if shutil.which("bwrap") is None:
        print("bwrap is missing: `make setup` installs Debian's bubblewrap", file=sys.stderr)
        return 2
    try:
        run(args)
    except PodCheckFailed as exc:
        say("FAIL", str(exc))
        print("pod-check: failed")
        return 1
    print("pod-check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
